using System.Runtime.InteropServices;

namespace MinLora;

/// <summary>
/// Process-wide tuning of the native (glibc) allocator that libtorch's CPU tensors use.
/// </summary>
/// <remarks>
/// glibc serves every allocation of 32 MiB or more with a fresh <c>mmap</c> and returns it to the system when freed,
/// so the next large temporary (a dequantized weight, an attention score matrix, a gradient) is paid page by page
/// again. Measured on a 2-core Debian 12 VM: allocating and filling a 32 MiB bfloat16 tensor took 9.9 ms by default
/// and 0.65 ms after <see cref="RetainFreedMemory()"/>; dequantizing a 4096×4096 int8 weight went from ~14 ms to ~2 ms.
/// The cost: memory freed by libtorch stays with the process (as with jemalloc or tcmalloc, which PyTorch users
/// often preload for the same reason). The same effect without code: start the process with
/// <c>MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2000000000</c>.
/// </remarks>
public static partial class NativeAllocator
{
    private const int M_TRIM_THRESHOLD = -1;
    private const int M_MMAP_THRESHOLD = -3;
    private const int M_MMAP_MAX = -4;
    private const int DefaultMmapMax = 65536;

    /// <summary>The largest <c>M_MMAP_THRESHOLD</c> glibc accepts on 64-bit systems: 32 MiB.</summary>
    public const long MaxRetainedBlockBytes = 32L << 20;

    /// <summary>
    /// Makes glibc keep freed memory for reuse instead of returning large blocks to the system (see remarks).
    /// Call once at application start-up, before the model is loaded. Does nothing where glibc is not the C library.
    /// </summary>
    /// <returns>True when the setting was applied.</returns>
    public static bool RetainFreedMemory()
    {
        lock (Gate)
        {
            bool applied = Apply((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, int.MaxValue));
            if (applied) { _policy = 0; _generation++; }
            return applied;
        }
    }

    /// <summary>
    /// Makes glibc keep freed blocks smaller than <paramref name="largestRetainedBlockBytes"/> for reuse, and serve larger
    /// ones with a fresh mapping that goes back to the system when freed. Call once at application start-up.
    /// </summary>
    /// <remarks>
    /// <para>
    /// <see cref="RetainFreedMemory()"/> keeps every freed block, so the heap only grows, and a training step's
    /// temporaries of many sizes leave holes between the tensors it keeps: measured on ChatGLM-6B int4 with
    /// <c>Int8Gemm</c> (LoRA step, 256 tokens, checkpointing), the peak RSS was 3.4–3.5 GB over the model, against 2.7–3.3 GB
    /// with the largest retained block at 32 MiB, 1.5–1.6 GB at 8 and 4 MiB and 0.8 GB at 1 MiB, where the step got slower as
    /// more temporaries were mapped and faulted in afresh (docs/measurements/cpu-model-6b.md).
    /// </para>
    /// <para>
    /// Sets <c>M_MMAP_THRESHOLD</c> (which also stops glibc from raising it dynamically), allows mappings again
    /// (<c>M_MMAP_MAX</c> back to glibc's default, which <see cref="RetainFreedMemory()"/> sets to 0) and keeps trimming
    /// off. The same without code: <c>MALLOC_MMAP_THRESHOLD_=<i>bytes</i> MALLOC_TRIM_THRESHOLD_=2000000000</c>.
    /// </para>
    /// </remarks>
    /// <param name="largestRetainedBlockBytes">Blocks of this size or more are mapped fresh; 1 to <see cref="MaxRetainedBlockBytes"/>.</param>
    /// <returns>True when the setting was applied; false where glibc is not the C library.</returns>
    /// <exception cref="ArgumentOutOfRangeException">The size is not in 1 … <see cref="MaxRetainedBlockBytes"/>.</exception>
    public static bool RetainFreedMemory(long largestRetainedBlockBytes)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(largestRetainedBlockBytes, 1);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(largestRetainedBlockBytes, MaxRetainedBlockBytes);
        lock (Gate)
        {
            bool applied = Apply((M_MMAP_MAX, DefaultMmapMax), (M_MMAP_THRESHOLD, (int)largestRetainedBlockBytes), (M_TRIM_THRESHOLD, int.MaxValue));
            if (applied) { _policy = largestRetainedBlockBytes; _generation++; }
            return applied;
        }
    }

    private static readonly object Gate = new();

    /// <summary>The policy last applied here: −1 none (glibc's own), 0 every block kept, else the largest block kept.</summary>
    private static long _policy = -1;

    /// <summary>Counts the policies applied by the public methods, so a scope does not undo a caller's later choice.</summary>
    private static long _generation;

    /// <summary>Open scopes of <see cref="ReturnLargeBlocksWhile"/>, and the generation their bound was applied at.</summary>
    private static int _scopes;
    private static long _scopeGeneration = -1;

    /// <summary>
    /// When this process keeps every freed block (<see cref="RetainFreedMemory()"/>), bounds it at
    /// <see cref="MaxRetainedBlockBytes"/> until the last open scope is disposed, then keeps every block again, unless
    /// the process chose a policy meanwhile. Under any other policy the scope does nothing. For work that frees many
    /// large blocks between long-lived ones (a checkpoint quantized while loading), where a heap that only grows would
    /// keep every hole. The setting is process-wide, like the policy itself.
    /// </summary>
    internal static IDisposable ReturnLargeBlocksWhile()
    {
        lock (Gate)
        {
            if (_scopes > 0)
            {
                _scopes++;
                return new Scope();
            }
            if (_policy != 0 || !RetainFreedMemory(MaxRetainedBlockBytes)) return new Scope(active: false);
            _scopes = 1;
            _scopeGeneration = _generation;
            return new Scope();
        }
    }

    private sealed class Scope(bool active = true) : IDisposable
    {
        private int _disposed = active ? 0 : 1;

        public void Dispose()
        {
            if (Interlocked.Exchange(ref _disposed, 1) != 0) return;
            lock (Gate)
            {
                // The last scope restores, unless a caller chose a policy after the bound was applied.
                if (--_scopes == 0 && _generation == _scopeGeneration) RetainFreedMemory();
            }
        }
    }

    /// <summary>Applies the <c>mallopt</c> settings in order; false off Linux, off glibc, or when glibc refuses one.</summary>
    private static bool Apply(params (int Param, int Value)[] settings)
    {
        if (!OperatingSystem.IsLinux()) return false;
        try
        {
            return settings.All(s => mallopt(s.Param, s.Value) == 1);
        }
        catch (Exception ex) when (ex is DllNotFoundException or EntryPointNotFoundException)
        {
            return false; // not glibc (e.g. musl)
        }
    }

    [LibraryImport("libc", EntryPoint = "mallopt")]
    private static partial int mallopt(int param, int value);
}
