using System.Diagnostics;
using System.Runtime.InteropServices;
using System.Text;

namespace MinLora.Distributed;

/// <summary>
/// The handful of MPI calls data parallelism needs, bound to Open MPI's C library at run time (no native code of ours,
/// no compile-time dependency: a single-process run never loads it).
/// </summary>
/// <remarks>
/// Open MPI's handles are addresses of exported objects (<c>MPI_COMM_WORLD</c> is <c>&amp;ompi_mpi_comm_world</c>,
/// <c>MPI_FLOAT</c> is <c>&amp;ompi_mpi_float</c>, …), so they are looked up with <c>dlsym</c>; MPICH's integer
/// handles are a different ABI and are refused with a clear message. The library is opened with
/// <c>RTLD_GLOBAL</c> because Open MPI's plugins (<c>mca_*.so</c>) resolve symbols of <c>libmpi</c> and
/// <c>libopen-pal</c> that a local <c>dlopen</c> (what <see cref="NativeLibrary"/> does) would hide from them.
/// Every collective is issued non-blocking and completed by polling <c>MPI_Test</c>, so a peer that stops answering
/// becomes a <see cref="DistributedTimeoutException"/> after a deadline instead of a hang.
/// </remarks>
internal sealed unsafe class OpenMpi
{
    private const int RtldNow = 0x2, RtldGlobal = 0x100;
    private const int MpiSuccess = 0, MpiThreadSerialized = 2, MaxErrorString = 256;
    private const int MaxCount = int.MaxValue;

    private readonly delegate* unmanaged<int*, byte***, int, int*, int> _initThread;
    private readonly delegate* unmanaged<int*, int> _initialized;
    private readonly delegate* unmanaged<int*, int> _finalized;
    private readonly delegate* unmanaged<int> _finalize;
    private readonly delegate* unmanaged<nint, int*, int> _commRank;
    private readonly delegate* unmanaged<nint, int*, int> _commSize;
    private readonly delegate* unmanaged<nint, nint, int> _commSetErrhandler;
    private readonly delegate* unmanaged<void*, void*, int, nint, nint, nint, nint*, int> _iallreduce;
    private readonly delegate* unmanaged<void*, int, nint, int, nint, nint*, int> _ibcast;
    private readonly delegate* unmanaged<nint, nint*, int> _ibarrier;
    private readonly delegate* unmanaged<nint*, int*, void*, int> _test;
    private readonly delegate* unmanaged<nint, int, int> _abort;
    private readonly delegate* unmanaged<int, byte*, int*, int> _errorString;

    /// <summary>MPI_COMM_WORLD.</summary>
    public nint World { get; }

    /// <summary>MPI_FLOAT, MPI_DOUBLE, MPI_BYTE.</summary>
    public nint Float { get; }

    /// <inheritdoc cref="Float"/>
    public nint Double { get; }

    /// <inheritdoc cref="Float"/>
    public nint Byte { get; }

    /// <summary>MPI_SUM, MPI_MIN, MPI_MAX.</summary>
    public nint Sum { get; }

    /// <inheritdoc cref="Sum"/>
    public nint Min { get; }

    /// <inheritdoc cref="Sum"/>
    public nint Max { get; }

    /// <summary>The library file that was opened.</summary>
    public string LibraryPath { get; }

    private OpenMpi(nint handle, string path)
    {
        LibraryPath = path;
        nint Sym(string name) => NativeLibrary.TryGetExport(handle, name, out var p) ? p
            : throw new DistributedException($"{path} has no symbol '{name}': MinLora.Distributed binds Open MPI (libmpi.so.40); other MPI implementations use a different ABI.");
        _initThread = (delegate* unmanaged<int*, byte***, int, int*, int>)Sym("MPI_Init_thread");
        _initialized = (delegate* unmanaged<int*, int>)Sym("MPI_Initialized");
        _finalized = (delegate* unmanaged<int*, int>)Sym("MPI_Finalized");
        _finalize = (delegate* unmanaged<int>)Sym("MPI_Finalize");
        _commRank = (delegate* unmanaged<nint, int*, int>)Sym("MPI_Comm_rank");
        _commSize = (delegate* unmanaged<nint, int*, int>)Sym("MPI_Comm_size");
        _commSetErrhandler = (delegate* unmanaged<nint, nint, int>)Sym("MPI_Comm_set_errhandler");
        _iallreduce = (delegate* unmanaged<void*, void*, int, nint, nint, nint, nint*, int>)Sym("MPI_Iallreduce");
        _ibcast = (delegate* unmanaged<void*, int, nint, int, nint, nint*, int>)Sym("MPI_Ibcast");
        _ibarrier = (delegate* unmanaged<nint, nint*, int>)Sym("MPI_Ibarrier");
        _test = (delegate* unmanaged<nint*, int*, void*, int>)Sym("MPI_Test");
        _abort = (delegate* unmanaged<nint, int, int>)Sym("MPI_Abort");
        _errorString = (delegate* unmanaged<int, byte*, int*, int>)Sym("MPI_Error_string");
        World = Sym("ompi_mpi_comm_world");
        Float = Sym("ompi_mpi_float");
        Double = Sym("ompi_mpi_double");
        Byte = Sym("ompi_mpi_byte");
        Sum = Sym("ompi_mpi_op_sum");
        Min = Sym("ompi_mpi_op_min");
        Max = Sym("ompi_mpi_op_max");
        ErrorsReturn = Sym("ompi_mpi_errors_return");
    }

    private nint ErrorsReturn { get; }

    // dlopen lives in libc from glibc 2.34 on and in libdl.so.2 before (RHEL 8, Debian 11, Ubuntu 20.04); libdl.so.2
    // still exists as a stub on newer systems, and macOS has it in libSystem (reached as "libc").
    private static class LibDl
    {
        [DllImport("libdl.so.2", EntryPoint = "dlopen")]
        internal static extern nint Open(string file, int mode);

        [DllImport("libdl.so.2", EntryPoint = "dlerror")]
        internal static extern nint Error();
    }

    private static class LibC
    {
        [DllImport("libc", EntryPoint = "dlopen")]
        internal static extern nint Open(string file, int mode);

        [DllImport("libc", EntryPoint = "dlerror")]
        internal static extern nint Error();
    }

    private static nint DlOpen(string file, int mode)
    {
        try { return LibDl.Open(file, mode); }
        catch (Exception ex) when (ex is DllNotFoundException or EntryPointNotFoundException) { return LibC.Open(file, mode); }
    }

    private static nint DlError()
    {
        try { return LibDl.Error(); }
        catch (Exception ex) when (ex is DllNotFoundException or EntryPointNotFoundException) { return LibC.Error(); }
    }

    /// <summary>Opens the first loadable library of <paramref name="candidates"/> with RTLD_GLOBAL.</summary>
    /// <exception cref="DistributedException">None loads, or the one that loads is not Open MPI.</exception>
    public static OpenMpi Load(IReadOnlyList<string> candidates)
    {
        if (!OperatingSystem.IsLinux() && !OperatingSystem.IsMacOS() && !OperatingSystem.IsFreeBSD())
            throw new DistributedException("MinLora.Distributed binds Open MPI, which runs on Linux and macOS; this process runs elsewhere.");
        var errors = new List<string>();
        foreach (var path in candidates)
        {
            var handle = DlOpen(path, RtldNow | RtldGlobal);
            if (handle != 0) return new OpenMpi(handle, path);
            var e = DlError();
            errors.Add(e == 0 ? path : Marshal.PtrToStringUTF8(e) ?? path);
        }
        throw new DistributedException("The process runs under an MPI launcher but Open MPI's library could not be loaded ("
            + string.Join("; ", errors) + "). Install Open MPI (Debian: apt-get install openmpi-bin) or set MINLORA_MPI_LIBRARY to libmpi.so's path.");
    }

    /// <summary>MPI_Init_thread(SERIALIZED) unless MPI is already initialized; errors return codes instead of aborting.</summary>
    public void Initialize()
    {
        int flag;
        Check(_finalized(&flag), "MPI_Finalized");
        if (flag != 0) throw new DistributedException("MPI was already finalized in this process; it cannot be initialized twice (create one DataParallel per process).");
        Check(_initialized(&flag), "MPI_Initialized");
        if (flag == 0)
        {
            int provided;
            Check(_initThread(null, null, MpiThreadSerialized, &provided), "MPI_Init_thread");
            // SERIALIZED is enough: every call comes through DataParallel under one lock, from any thread.
            if (provided < MpiThreadSerialized)
                throw new DistributedException($"Open MPI provides thread level {provided}; MinLora.Distributed needs MPI_THREAD_SERIALIZED ({MpiThreadSerialized}).");
        }
        Check(_commSetErrhandler(World, ErrorsReturn), "MPI_Comm_set_errhandler");
    }

    /// <summary>Whether MPI_Finalize has run.</summary>
    public bool IsFinalized
    {
        get
        {
            int flag;
            return _finalized(&flag) == MpiSuccess && flag != 0;
        }
    }

    public int Rank()
    {
        int r;
        Check(_commRank(World, &r), "MPI_Comm_rank");
        return r;
    }

    public int Size()
    {
        int s;
        Check(_commSize(World, &s), "MPI_Comm_size");
        return s;
    }

    public void Shutdown() => Check(_finalize(), "MPI_Finalize");

    /// <summary>MPI_Abort on the world: ends every process of the job (this one included).</summary>
    public void Abort(int code) => _abort(World, code);

    /// <summary>In-place allreduce of <paramref name="count"/> elements (chunked past int.MaxValue), each chunk waited for with a deadline.</summary>
    public void AllreduceInPlace(void* buffer, long count, int elementSize, nint type, nint op, TimeSpan timeout, string what)
    {
        for (long done = 0; done < count;)
        {
            int n = (int)Math.Min(MaxCount, count - done);
            nint request;
            Check(_iallreduce((void*)1 /* MPI_IN_PLACE */, (byte*)buffer + done * elementSize, n, type, op, World, &request), "MPI_Iallreduce");
            Wait(&request, timeout, what);
            done += n;
        }
    }

    /// <summary>Broadcast of <paramref name="bytes"/> bytes from <paramref name="root"/> (chunked), each chunk waited for with a deadline.</summary>
    public void Broadcast(void* buffer, long bytes, int root, TimeSpan timeout, string what)
    {
        for (long done = 0; done < bytes;)
        {
            int n = (int)Math.Min(MaxCount, bytes - done);
            nint request;
            Check(_ibcast((byte*)buffer + done, n, Byte, root, World, &request), "MPI_Ibcast");
            Wait(&request, timeout, what);
            done += n;
        }
    }

    public void Barrier(TimeSpan timeout, string what)
    {
        nint request;
        Check(_ibarrier(World, &request), "MPI_Ibarrier");
        Wait(&request, timeout, what);
    }

    /// <summary>
    /// Polls MPI_Test (which also drives Open MPI's progress engine) until the request completes: spinning first,
    /// then yielding, then sleeping a millisecond, so a long wait does not burn a core the training needs.
    /// </summary>
    private void Wait(nint* request, TimeSpan timeout, string what)
    {
        var clock = Stopwatch.StartNew();
        for (int i = 0; ; i++)
        {
            int flag;
            Check(_test(request, &flag, null /* MPI_STATUS_IGNORE */), "MPI_Test");
            if (flag != 0) return;
            if (clock.Elapsed > timeout)
                throw new DistributedTimeoutException($"{what} did not complete within {timeout.TotalSeconds:0.#} s: another rank stopped answering (it died, hangs, or runs different code). The job cannot continue.");
            if (i < 1000) Thread.SpinWait(20);
            else if (i < 2000) Thread.Yield();
            else Thread.Sleep(1);
        }
    }

    private void Check(int code, string call)
    {
        if (code == MpiSuccess) return;
        var text = new byte[MaxErrorString + 1];
        int length = 0;
        fixed (byte* p = text)
        {
            if (_errorString(code, p, &length) != MpiSuccess) length = 0;
        }
        var message = length > 0 ? Encoding.UTF8.GetString(text, 0, Math.Min(length, MaxErrorString)) : "unknown error";
        throw new DistributedException($"{call} failed with MPI error {code}: {message}.");
    }
}
