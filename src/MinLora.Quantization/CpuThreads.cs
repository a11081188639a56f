using System.Runtime.InteropServices;

namespace MinLora.Quantization;

/// <summary>
/// Process-wide threading setting for mixing libtorch's CPU ops with MinLora's own kernels.
/// </summary>
/// <remarks>
/// libtorch's CPU build runs its parallel regions on OpenMP (GNU libgomp), whose worker threads keep spinning for a
/// while after each region. MinLora's CPU kernels (<see cref="QuantizedKernel.CpuGemv"/>) run on .NET's thread pool,
/// so right after a libtorch op the spinning OpenMP thread holds the very core a kernel thread needs. Measured with
/// perf while decoding ChatGLM-6B int4 on a 2-core VM: 33 % of all samples were libgomp spinning, and passive waiting
/// took a token from 531 to 419 ms. libgomp reads the policy once, when libtorch is loaded, so call
/// <see cref="UsePassiveOpenMpWaiting"/> first thing in <c>Main</c>, or start the process with
/// <c>OMP_WAIT_POLICY=PASSIVE</c>.
/// </remarks>
public static partial class CpuThreads
{
    /// <summary>
    /// Sets <c>OMP_WAIT_POLICY=PASSIVE</c> for the native libraries of this process unless the variable is already set.
    /// Has an effect only before the first TorchSharp call (which loads libtorch and its OpenMP runtime).
    /// </summary>
    /// <returns>True when the policy is passive for an OpenMP runtime loaded after this call (or already set so).</returns>
    public static bool UsePassiveOpenMpWaiting()
    {
        if (OperatingSystem.IsWindows()) return false;
        var current = Environment.GetEnvironmentVariable("OMP_WAIT_POLICY");
        if (current is not null) return string.Equals(current, "PASSIVE", StringComparison.OrdinalIgnoreCase);
        if (OpenMpLoaded()) return false;
        try
        {
            // .NET keeps its own copy of the environment on Unix: the native one must be set for libgomp to see it.
            if (setenv("OMP_WAIT_POLICY", "PASSIVE", 0) != 0) return false;
            Environment.SetEnvironmentVariable("OMP_WAIT_POLICY", "PASSIVE");
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
