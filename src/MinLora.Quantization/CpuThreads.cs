using System.Runtime.InteropServices;

namespace MinLora.Quantization;

/// <summary>
/// Process-wide threading setting for mixing libtorch's CPU ops with MinLora's own kernels.
/// </summary>
/// <remarks>
/// libtorch's CPU build runs its parallel regions on OpenMP (GNU libgomp), whose worker threads keep spinning for a
/// while after each region. MinLora's CPU kernels (<see cref="QuantizedKernel.CpuGemv"/>) run on threads of their own
/// (<see cref="CpuParallel"/>), so right after a libtorch op the spinning OpenMP thread holds the very core a kernel
/// thread needs. Measured with
/// perf while decoding ChatGLM-6B int4 on a 2-core VM: 33 % of all samples were libgomp spinning, and passive waiting
/// took a token from 531 to 419 ms. Workloads made of many small libtorch ops lose instead (the SPO sample's
/// training: 66 s with libgomp's default spinning, 79 s with 10,000 spins, ~81 s passive), so applications that
/// mostly decode call <see cref="LimitOpenMpSpinning"/> first thing in <c>Main</c> (or start with
/// <c>OMP_WAIT_POLICY=PASSIVE</c>) and training applications leave the default. libgomp reads the setting once,
/// when libtorch is loaded.
/// </remarks>
public static partial class CpuThreads
{
    /// <summary>
    /// Limits how long libtorch's OpenMP threads spin after a parallel region (<c>GOMP_SPINCOUNT</c>; libgomp's
    /// default is 300,000 iterations) unless <c>OMP_WAIT_POLICY</c> or <c>GOMP_SPINCOUNT</c> is already set, so that a
    /// MinLora kernel that follows a libtorch op gets the cores. Worth it where MinLora's kernels carry the work
    /// (decoding); where libtorch's own small ops do (training a small model), spinning threads are faster. Has an
    /// effect only before the first TorchSharp call (which loads libtorch and its OpenMP runtime).
    /// </summary>
    /// <param name="spinCount">Spin iterations before an idle OpenMP thread sleeps (default 0: passive waiting).</param>
    /// <returns>True when the setting is in place for an OpenMP runtime loaded after this call.</returns>
    public static bool LimitOpenMpSpinning(long spinCount = 0)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(spinCount);
        if (OperatingSystem.IsWindows()) return false;
        if (Environment.GetEnvironmentVariable("OMP_WAIT_POLICY") is not null || Environment.GetEnvironmentVariable("GOMP_SPINCOUNT") is not null)
            return false;
        if (OpenMpLoaded()) return false;
        try
        {
            // .NET keeps its own copy of the environment on Unix: the native one must be set for libgomp to see it.
            var value = spinCount.ToString(System.Globalization.CultureInfo.InvariantCulture);
            if (setenv("GOMP_SPINCOUNT", value, 0) != 0) return false;
            Environment.SetEnvironmentVariable("GOMP_SPINCOUNT", value);
            return true;
        }
        catch (Exception ex) when (ex is DllNotFoundException or EntryPointNotFoundException)
        {
            return false;
        }
    }

    private static bool OpenMpLoaded()
    {
        try
        {
            return File.Exists("/proc/self/maps") && File.ReadLines("/proc/self/maps").Any(l => l.Contains("libgomp", StringComparison.Ordinal) || l.Contains("libiomp", StringComparison.Ordinal));
        }
        catch (IOException)
        {
            return false;
        }
    }

    [LibraryImport("libc", EntryPoint = "setenv", StringMarshalling = StringMarshalling.Utf8)]
    private static partial int setenv(string name, string value, int overwrite);
}
