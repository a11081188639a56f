using System.Diagnostics;
using System.Security.Cryptography;
using System.Text;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using TorchSharp;
using static TorchSharp.torch;

namespace MinLora.Distributed;

/// <summary>How <see cref="DataParallel.Initialize"/> decides between one process and MPI.</summary>
public enum DataParallelMode
{
    /// <summary>MPI when the process was started by an MPI launcher (mpirun, srun with PMIx), else one process without MPI.</summary>
    Auto,

    /// <summary>One process; MPI is never loaded (every collective is a no-op).</summary>
    SingleProcess,

    /// <summary>MPI, even when no launcher is detected (a singleton MPI job of one rank).</summary>
    Mpi,
}

/// <summary>Settings of a data-parallel job.</summary>
public sealed record DataParallelOptions
{
    /// <summary>One process or MPI (default: detect the launcher).</summary>
    public DataParallelMode Mode { get; init; } = DataParallelMode.Auto;

    /// <summary>
    /// How long one collective operation may wait for the other ranks before the job is declared broken
    /// (default 10 minutes: longer than any rank should ever run ahead of the others, e.g. rank 0 saving a checkpoint
    /// while the others wait at a barrier). A rank that dies is normally reported sooner by the launcher itself.
    /// </summary>
    public TimeSpan Timeout { get; init; } = TimeSpan.FromMinutes(10);

    /// <summary>Open MPI's library (default: <c>MINLORA_MPI_LIBRARY</c>, then <c>libmpi.so.40</c>, <c>libmpi.so</c>).</summary>
    public string? MpiLibraryPath { get; init; }
}

/// <summary>
/// Data-parallel training over MPI, Horovod's design: one process per device or machine, each computing gradients on
/// its share of every global batch; the trainable parameters start identical (broadcast from rank 0) and stay
/// identical because every rank applies the same averaged gradients.
/// </summary>
/// <remarks>
/// <para>A training loop composes it:</para>
/// <code>
/// using var dp = DataParallel.Initialize();                 // rank / world size from mpirun; no MPI when run alone
/// model.AddLora(config);
/// dp.BroadcastParameters(model);                            // checks the ranks hold the same adapter, copies rank 0's
/// foreach (var globalBatch in batches)                      // the same order on every rank (same seed)
/// {
///     var mine = dp.ShardBatch(globalBatch);                // this rank's contiguous share
///     optimizer.zero_grad();
///     var loss = Loss(model, mine); loss.backward();        // mean over this rank's label tokens
///     dp.AverageGradients(parameters, localWeight: tokens); // one fused allreduce: Σ wᵣ·gᵣ / Σ wᵣ
///     optimizer.step();
/// }
/// if (dp.IsMainProcess) model.SaveLoraAdapter(dir);         // only rank 0 writes
/// </code>
/// <para>
/// Every collective is non-blocking and completed by polling with <see cref="DataParallelOptions.Timeout"/>: a rank
/// that stops answering becomes a <see cref="DistributedTimeoutException"/> on the others, and disposing a
/// <see cref="DataParallel"/> after a failed collective calls <c>MPI_Abort</c>, which ends every process of the job
/// (a normal <c>MPI_Finalize</c> would wait for the missing rank forever). Calls are serialized by a lock, so any
/// thread may make them, one at a time.
/// </para>
/// </remarks>
public sealed class DataParallel : IDisposable
{
    private static readonly object s_initGate = new();
    private static bool s_created;
    private readonly OpenMpi? _mpi;
    private readonly ILogger _logger;
    private readonly object _gate = new();
    private readonly Stopwatch _communication = new();
    private Tensor? _gradientBuffer;
    private bool _faulted, _disposed, _inMainProcessAction;

    private DataParallel(OpenMpi? mpi, int rank, int size, TimeSpan timeout, ILogger logger)
    {
        _mpi = mpi;
        Rank = rank;
        WorldSize = size;
        Timeout = timeout;
        _logger = logger;
    }

    /// <summary>This process's rank, 0 … <see cref="WorldSize"/> − 1.</summary>
    public int Rank { get; }

    /// <summary>Number of processes in the job (1 without MPI).</summary>
    public int WorldSize { get; }

    /// <summary>This process's rank among the ranks on the same machine (Open MPI's <c>OMPI_COMM_WORLD_LOCAL_RANK</c>; 0 without MPI): the GPU to use, for instance.</summary>
    public int LocalRank { get; private init; }

    /// <summary>Ranks on this machine (<c>OMPI_COMM_WORLD_LOCAL_SIZE</c>; 1 without MPI): divide the CPU threads by it.</summary>
    public int LocalWorldSize { get; private init; } = 1;

    /// <summary>Whether this is rank 0, the process that writes files and prints progress.</summary>
    public bool IsMainProcess => Rank == 0;

    /// <summary>Whether MPI is in use (false for a plain single-process run).</summary>
    public bool UsesMpi => _mpi is not null;

    /// <summary>The deadline of each collective operation.</summary>
    public TimeSpan Timeout { get; }

    /// <summary>Total time spent in collective operations so far (waiting for other ranks included).</summary>
    public TimeSpan CommunicationTime => _communication.Elapsed;

    /// <summary>Whether a collective failed (timeout, mismatch, MPI error): the job cannot continue.</summary>
    public bool IsFaulted => _faulted;

    /// <summary>
    /// Joins the job: under an MPI launcher (or with <see cref="DataParallelMode.Mpi"/>) loads Open MPI and initializes
    /// it; otherwise returns a single-process instance that never touches MPI. One instance per process.
    /// </summary>
    /// <param name="options">Mode, timeout, library path (defaults when null).</param>
    /// <param name="logger">Where rank, world size and failures are logged (nothing when null).</param>
    /// <returns>The instance; dispose it at the end of the job (MPI_Finalize).</returns>
    /// <exception cref="ArgumentOutOfRangeException">A timeout that is not positive.</exception>
    /// <exception cref="InvalidOperationException">A second instance in the same process (MPI initializes once).</exception>
    /// <exception cref="DistributedException">MPI is wanted but Open MPI cannot be loaded or initialized.</exception>
    public static DataParallel Initialize(DataParallelOptions? options = null, ILogger? logger = null)
    {
        options ??= new DataParallelOptions();
        logger ??= NullLogger.Instance;
        if (options.Timeout <= TimeSpan.Zero)
            throw new ArgumentOutOfRangeException(nameof(options), options.Timeout, "DataParallelOptions.Timeout must be positive.");
        bool useMpi = options.Mode switch
        {
            DataParallelMode.SingleProcess => false,
            DataParallelMode.Mpi => true,
            DataParallelMode.Auto => LaunchedByMpi(),
            _ => throw new ArgumentOutOfRangeException(nameof(options), options.Mode, "Unknown DataParallelMode."),
        };
        if (!useMpi)
        {
            logger.LogInformation("Data parallel: single process (no MPI launcher detected)");
            return new DataParallel(null, 0, 1, options.Timeout, logger);
        }
        lock (s_initGate)
        {
            if (s_created)
                throw new InvalidOperationException("DataParallel with MPI was already initialized in this process; MPI can be initialized only once per process, so keep one instance for the whole job.");
            var mpi = OpenMpi.Load(LibraryCandidates(options.MpiLibraryPath));
            mpi.Initialize();
            s_created = true;
            int rank = mpi.Rank(), size = mpi.Size();
            // A launcher of another MPI (MPICH's hydra sets PMI_SIZE) would start N separate one-rank Open MPI jobs, all
            // believing they are rank 0 and all writing the output: refuse instead.
            var launched = EnvironmentInt("OMPI_COMM_WORLD_SIZE") ?? EnvironmentInt("PMIX_SIZE") ?? EnvironmentInt("PMI_SIZE");
            if (launched is { } expected && expected != size)
            {
                mpi.Abort(1);
                throw new DistributedException($"The launcher started {expected} processes but Open MPI sees a world of {size}: the job was started by another MPI's launcher. Use Open MPI's mpirun.");
            }
            var dp = new DataParallel(mpi, rank, size, options.Timeout, logger)
            {
                // The launcher's own variables: Open MPI's mpirun, PMIx launchers, MPICH's hydra, Slurm.
                LocalRank = EnvironmentInt("OMPI_COMM_WORLD_LOCAL_RANK") ?? EnvironmentInt("PMIX_LOCAL_RANK") ?? EnvironmentInt("MPI_LOCALRANKID") ?? EnvironmentInt("SLURM_LOCALID") ?? 0,
                LocalWorldSize = EnvironmentInt("OMPI_COMM_WORLD_LOCAL_SIZE") ?? EnvironmentInt("PMIX_LOCAL_SIZE") ?? EnvironmentInt("MPI_LOCALNRANKS") ?? EnvironmentInt("SLURM_NTASKS_PER_NODE") ?? 1,
            };
            logger.LogInformation("Data parallel: rank {Rank} of {WorldSize} (Open MPI, {Library}, timeout {Timeout:0} s)", dp.Rank, dp.WorldSize, mpi.LibraryPath, options.Timeout.TotalSeconds);
            return dp;
        }
    }

    /// <summary>Whether an MPI launcher started this process (Open MPI's mpirun, or a PMI/PMIx launcher such as srun).</summary>
    public static bool LaunchedByMpi() =>
        !string.IsNullOrEmpty(Environment.GetEnvironmentVariable("OMPI_COMM_WORLD_SIZE"))
        || !string.IsNullOrEmpty(Environment.GetEnvironmentVariable("PMIX_RANK"))
        || !string.IsNullOrEmpty(Environment.GetEnvironmentVariable("PMI_RANK"));

    private static int? EnvironmentInt(string name) =>
        int.TryParse(Environment.GetEnvironmentVariable(name), System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out var v) ? v : null;

    private static List<string> LibraryCandidates(string? explicitPath)
    {
        if (!string.IsNullOrEmpty(explicitPath)) return [explicitPath];
        var fromEnvironment = Environment.GetEnvironmentVariable("MINLORA_MPI_LIBRARY");
        if (!string.IsNullOrEmpty(fromEnvironment)) return [fromEnvironment];
        return OperatingSystem.IsMacOS() ? ["libmpi.40.dylib", "libmpi.dylib"] : ["libmpi.so.40", "libmpi.so"];
    }

    /// <summary>
    /// Checks that every rank holds the same tensors (names, types, shapes; a <see cref="DistributedMismatchException"/>
    /// naming the first difference otherwise) and copies rank <paramref name="root"/>'s values into all of them.
    /// </summary>
    /// <param name="tensors">Named tensors in the same order on every rank (e.g. the adapter's parameters).</param>
    /// <param name="root">The rank whose values win.</param>
    /// <exception cref="DistributedMismatchException">The ranks hold different tensors.</exception>
    /// <exception cref="DistributedTimeoutException">A rank did not take part in time.</exception>
    public void BroadcastParameters(IEnumerable<(string Name, Tensor Tensor)> tensors, int root = 0)
    {
        ArgumentNullException.ThrowIfNull(tensors);
        var list = tensors.ToList();
        if (root < 0 || root >= WorldSize)
            throw Refuse(new ArgumentOutOfRangeException(nameof(root), root, $"The root must be a rank in [0, {WorldSize})."));
        foreach (var (name, t) in list)
        {
            if (t is null) throw Refuse(new ArgumentNullException(nameof(tensors), $"Tensor '{name}' is null."));
            if (t.IsInvalid) throw Refuse(new ObjectDisposedException(name, $"Tensor '{name}' was disposed."));
        }
        if (_mpi is null || WorldSize == 1) return;
        Collective("broadcast of the parameters", () =>
        {
            VerifySameLayout(Layout(list), "parameters", root);
            long total = 0;
            using var scope = NewDisposeScope();
            using var _ = no_grad();
            foreach (var group in list.GroupBy(p => p.Tensor.dtype))
            {
                long count = group.Sum(p => p.Tensor.numel());
                if (count == 0) continue;
                // Segments of at most 1 GiB (a raw span of a tensor is limited to 2 GiB), tensors split across them.
                int elementSize = (int)group.First().Tensor.element_size();
                long segment = Math.Min(count, (1L << 30) / elementSize);
                var buffer = empty(segment, group.Key, CPU);
                var pending = new List<(Tensor Destination, long Offset, long Count)>();
                var copies = new List<(Tensor Original, Tensor Contiguous)>();
                long used = 0;
                void Flush()
                {
                    if (used == 0) return;
                    unsafe { _mpi.Broadcast(Address(buffer), used * elementSize, root, Timeout, "broadcast of the parameters"); }
                    foreach (var (destination, offset, n) in pending) destination.copy_(buffer.narrow(0, offset, n));
                    total += used * elementSize;
                    pending.Clear();
                    used = 0;
                }
                foreach (var (_, t) in group)
                {
                    var flat = t.is_contiguous() ? t.view(-1) : t.contiguous().view(-1);
                    if (!t.is_contiguous()) copies.Add((t, flat));
                    for (long start = 0; start < flat.numel();)
                    {
                        long n = Math.Min(segment - used, flat.numel() - start);
                        var piece = flat.narrow(0, start, n);
                        buffer.narrow(0, used, n).copy_(piece);
                        pending.Add((piece, used, n));
                        used += n;
                        start += n;
                        if (used == segment) Flush();
                    }
                }
                Flush();
                foreach (var (original, contiguous) in copies) original.copy_(contiguous.view(original.shape));
            }
            _logger.LogInformation("Rank {Rank}: {Count} tensors ({Bytes:N0} bytes) broadcast from rank {Root}", Rank, list.Count, total, root);
        });
    }

    /// <summary>Broadcasts a module's parameters from rank 0 (the trainable ones only, by default).</summary>
    /// <param name="module">The model.</param>
    /// <param name="trainableOnly">Only parameters with <c>requires_grad</c> (a LoRA adapter), or all of them.</param>
    /// <inheritdoc cref="BroadcastParameters(IEnumerable{ValueTuple{string, Tensor}}, int)" path="/exception"/>
    public void BroadcastParameters(nn.Module module, bool trainableOnly = true)
    {
        ArgumentNullException.ThrowIfNull(module);
        BroadcastParameters(module.named_parameters().Where(p => !trainableOnly || p.parameter.requires_grad).Select(p => (p.name, (Tensor)p.parameter)));
    }

    /// <summary>
    /// Averages the gradients of <paramref name="parameters"/> over the ranks in one fused allreduce:
    /// each gradient becomes Σᵣ wᵣ·gᵣ ÷ Σᵣ wᵣ, where gᵣ is rank r's gradient (the mean over its share) and wᵣ its
    /// <paramref name="localWeight"/>. With equal shares pass 1 (a plain mean); with shares of different sizes pass the
    /// number of examples or label tokens the local loss averaged over, and the result is exactly the gradient of the
    /// mean over the whole global batch. A missing gradient counts as zeros (a rank with an empty share).
    /// Single-process: the gradients are left as they are.
    /// </summary>
    /// <param name="parameters">The trainable parameters, in the same order on every rank.</param>
    /// <param name="localWeight">This rank's weight (≥ 0, finite); the ranks' weights must not all be 0.</param>
    /// <returns>The total weight Σᵣ wᵣ (the local weight when single-process).</returns>
    /// <remarks>
    /// With gradient accumulation, call it once per optimizer step, after the last micro-batch's backward (scale each
    /// micro-batch's loss by its share of the local weight so the accumulated gradient is the local mean). The reduction
    /// runs in float32 (float64 when a parameter is float64) on a buffer kept between steps; gradients on a GPU are
    /// staged through it.
    /// </remarks>
    /// <exception cref="ArgumentOutOfRangeException">A negative or non-finite weight.</exception>
    /// <exception cref="DistributedMismatchException">The ranks pass different parameter lists.</exception>
    /// <exception cref="DistributedTimeoutException">A rank did not take part in time.</exception>
    /// <exception cref="InvalidOperationException">Every rank passed weight 0.</exception>
    public double AverageGradients(IEnumerable<Tensor> parameters, double localWeight = 1)
    {
        ArgumentNullException.ThrowIfNull(parameters);
        if (!double.IsFinite(localWeight) || localWeight < 0)
            throw Refuse(new ArgumentOutOfRangeException(nameof(localWeight), localWeight, "The local weight must be a finite number ≥ 0."));
        var list = parameters.ToList();
        for (int i = 0; i < list.Count; i++)
        {
            if (list[i] is null) throw Refuse(new ArgumentNullException(nameof(parameters), $"Parameter {i} is null."));
            if (list[i].IsInvalid) throw Refuse(new ObjectDisposedException(nameof(parameters), $"Parameter {i} was disposed."));
        }
        if (_mpi is null || WorldSize == 1) return localWeight;
        double totalWeight = 0;
        Collective("gradient allreduce", () =>
        {
            // Every call compares the layouts (one 16-byte allreduce): a rank whose list changed must not meet the
            // others' gradient allreduce with a collective of another size.
            VerifySameLayout(Layout(list.Select((p, i) => ($"#{i}", p))), "trainable parameters", 0);
            var type = list.Any(p => p.dtype == ScalarType.Float64) ? ScalarType.Float64 : ScalarType.Float32;
            long total = list.Sum(p => p.numel());
            // Layout: the weighted gradients, one "had a gradient" count per parameter, the weight.
            long length = total + list.Count + 1;
            long limit = int.MaxValue / (type == ScalarType.Float64 ? 8 : 4);
            if (length > limit)
                throw new ArgumentException($"AverageGradients fuses at most {limit:N0} values per call ({length:N0} given): call it once per group of parameters.", nameof(parameters));
            if (_gradientBuffer is null || _gradientBuffer.numel() != length || _gradientBuffer.dtype != type)
            {
                _gradientBuffer?.Dispose();
                _gradientBuffer = empty(length, type, CPU).DetachFromDisposeScope();
            }
            var buffer = _gradientBuffer;
            using var scope = NewDisposeScope();
            using var _ = no_grad();
            var values = buffer.narrow(0, 0, total);
            var flags = buffer.narrow(0, total, list.Count);
            bool contributes = localWeight > 0;
            var hadLocal = new double[list.Count];
            long offset = 0;
            for (int i = 0; i < list.Count; i++)
            {
                long n = list[i].numel();
                var slice = buffer.narrow(0, offset, n);
                var g = list[i].grad;
                // A rank with weight 0 sends zeros, not its gradient: a loss over no tokens is NaN, and NaN·0 is NaN.
                if (g is null || !contributes) slice.zero_();
                else slice.copy_(g.reshape(-1));
                hadLocal[i] = g is not null && contributes ? 1 : 0;
                offset += n;
            }
            if (contributes && localWeight != 1) values.mul_(localWeight);
            flags.copy_(tensor(hadLocal));
            buffer[length - 1] = tensor(localWeight, type);
            unsafe
            {
                _mpi.AllreduceInPlace(Address(buffer), length, (int)buffer.ElementSize,
                    type == ScalarType.Float64 ? _mpi.Double : _mpi.Float, _mpi.Sum, Timeout, "gradient allreduce");
            }
            totalWeight = buffer[length - 1].ToDouble();
            if (!(totalWeight > 0))
                throw new InvalidOperationException($"Every rank passed localWeight 0 to AverageGradients (total {totalWeight}): there is nothing to average.");
            values.div_(totalWeight);
            var had = flags.to(ScalarType.Float64).data<double>().ToArray();
            offset = 0;
            for (int i = 0; i < list.Count; i++)
            {
                var p = list[i];
                long n = p.numel();
                var averaged = buffer.narrow(0, offset, n).view(p.shape);
                offset += n;
                if (had[i] == 0)
                {
                    // No rank had a gradient: leave none anywhere, as one process would (optimizers skip such
                    // parameters; a zero gradient would still apply weight decay and momentum).
                    if (p.grad is not null) p.grad = null;
                    continue;
                }
                var g = p.grad;
                if (g is null) p.grad = averaged.to(p.dtype, p.device).clone();
                else g.copy_(averaged);
            }
        });
        return totalWeight;
    }
    /// <summary>Sums <paramref name="values"/> element-wise over the ranks, in place (metrics: loss sums, counts).</summary>
    /// <param name="values">This rank's values; on return the sums over all ranks.</param>
    /// <exception cref="DistributedTimeoutException">A rank did not take part in time.</exception>
    public void AllreduceSum(Span<double> values) => Reduce(values, ReduceOp.Sum);

    /// <summary>Element-wise maximum over the ranks, in place.</summary>
    /// <param name="values">This rank's values; on return the maxima.</param>
    public void AllreduceMax(Span<double> values) => Reduce(values, ReduceOp.Max);

    /// <summary>Element-wise minimum over the ranks, in place.</summary>
    /// <param name="values">This rank's values; on return the minima.</param>
    public void AllreduceMin(Span<double> values) => Reduce(values, ReduceOp.Min);

    /// <summary>Sum of one value over the ranks.</summary>
    /// <param name="value">This rank's value.</param>
    /// <returns>The sum.</returns>
    public double AllreduceSum(double value)
    {
        Span<double> v = [value];
        AllreduceSum(v);
        return v[0];
    }

    private enum ReduceOp { Sum, Max, Min }

    private void Reduce(Span<double> values, ReduceOp op)
    {
        if (_mpi is null || WorldSize == 1 || values.IsEmpty) return;
        // Pinned: a request that times out may still complete into it later (it is then kept alive, see s_orphans).
        var copy = GC.AllocateUninitializedArray<double>(values.Length, pinned: true);
        values.CopyTo(copy);
        try
        {
            Collective("metric allreduce", () =>
            {
                unsafe
                {
                    fixed (double* p = copy)
                        _mpi.AllreduceInPlace(p, copy.Length, sizeof(double), _mpi.Double,
                            op switch { ReduceOp.Sum => _mpi.Sum, ReduceOp.Max => _mpi.Max, _ => _mpi.Min }, Timeout, "metric allreduce");
                }
            });
        }
        catch
        {
            lock (s_orphans) s_orphans.Add(copy);
            throw;
        }
        copy.CopyTo(values);
    }

    /// <summary>Waits until every rank arrives.</summary>
    /// <param name="timeout">This wait's deadline (default: <see cref="Timeout"/>), e.g. longer while rank 0 saves.</param>
    public void Barrier(TimeSpan? timeout = null)
    {
        if (_mpi is null || WorldSize == 1) return;
        Collective("barrier", () => _mpi.Barrier(timeout ?? Timeout, "barrier"));
    }

    /// <summary>
    /// Runs <paramref name="action"/> on rank 0 only (saving files), then tells every rank whether it succeeded: when it
    /// failed, rank 0 rethrows its exception and the other ranks throw a <see cref="DistributedException"/>, so no rank
    /// goes on as if the result existed.
    /// </summary>
    /// <param name="action">The work (e.g. an atomic save).</param>
    /// <param name="what">What it does, for the other ranks' error message.</param>
    /// <param name="timeout">How long the other ranks wait for it (default: <see cref="Timeout"/>).</param>
    public void RunOnMainProcess(Action action, string what, TimeSpan? timeout = null)
    {
        ArgumentNullException.ThrowIfNull(action);
        ArgumentException.ThrowIfNullOrWhiteSpace(what);
        Exception? failure = null;
        if (IsMainProcess)
        {
            _inMainProcessAction = true;
            try { action(); }
            catch (Exception ex) { failure = ex; }
            finally { _inMainProcessAction = false; }
        }
        if (_mpi is not null && WorldSize > 1)
        {
            var flag = new[] { failure is null ? 0.0 : 1.0 };
            Collective($"the end of {what} on rank 0", () =>
            {
                unsafe
                {
                    fixed (double* p = flag)
                        _mpi.AllreduceInPlace(p, 1, sizeof(double), _mpi.Double, _mpi.Max, timeout ?? Timeout, $"the end of {what} on rank 0");
                }
            });
            if (failure is null && flag[0] != 0) throw new DistributedException($"Rank 0 failed at {what}; see rank 0's error.");
        }
        if (failure is not null) System.Runtime.ExceptionServices.ExceptionDispatchInfo.Capture(failure).Throw();
    }

    /// <summary>This rank's contiguous share of a global batch of <paramref name="globalCount"/> items: sizes differ by at most one, lower ranks take the extra items.</summary>
    /// <param name="globalCount">Items in the global batch (≥ 0).</param>
    /// <returns>The first index and the number of items of this rank.</returns>
    public (int Start, int Count) ShardRange(int globalCount) => ShardRange(globalCount, Rank, WorldSize);

    /// <summary>The share of rank <paramref name="rank"/> of <paramref name="worldSize"/> (see <see cref="ShardRange(int)"/>).</summary>
    /// <param name="globalCount">Items in the global batch (≥ 0).</param>
    /// <param name="rank">The rank.</param>
    /// <param name="worldSize">The number of ranks.</param>
    /// <returns>The first index and the number of items.</returns>
    public static (int Start, int Count) ShardRange(int globalCount, int rank, int worldSize)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(globalCount);
        ArgumentOutOfRangeException.ThrowIfLessThan(worldSize, 1);
        ArgumentOutOfRangeException.ThrowIfNegative(rank);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(rank, worldSize);
        int share = globalCount / worldSize, extra = globalCount % worldSize;
        return (rank * share + Math.Min(rank, extra), share + (rank < extra ? 1 : 0));
    }

    /// <summary>This rank's contiguous share of one global batch (the same batch on every rank, e.g. from a shared seed).</summary>
    /// <typeparam name="T">Item type.</typeparam>
    /// <param name="globalBatch">The global batch.</param>
    /// <returns>The items of this rank (possibly none when the batch is smaller than the world).</returns>
    public IReadOnlyList<T> ShardBatch<T>(IReadOnlyList<T> globalBatch)
    {
        ArgumentNullException.ThrowIfNull(globalBatch);
        var (start, count) = ShardRange(globalBatch.Count);
        var result = new T[count];
        for (int i = 0; i < count; i++) result[i] = globalBatch[start + i];
        return result;
    }

    /// <summary>Every <see cref="WorldSize"/>-th item starting at <see cref="Rank"/>: a deterministic split of a dataset (evaluation sets) in which every item goes to exactly one rank.</summary>
    /// <typeparam name="T">Item type.</typeparam>
    /// <param name="items">The whole dataset.</param>
    /// <returns>This rank's items.</returns>
    public IReadOnlyList<T> ShardDataset<T>(IReadOnlyList<T> items) => ShardDataset(items, Rank, WorldSize);

    /// <summary>The items of rank <paramref name="rank"/> of <paramref name="worldSize"/> (see <see cref="ShardDataset{T}(IReadOnlyList{T})"/>).</summary>
    /// <typeparam name="T">Item type.</typeparam>
    /// <param name="items">The whole dataset.</param>
    /// <param name="rank">The rank.</param>
    /// <param name="worldSize">The number of ranks.</param>
    /// <returns>The rank's items.</returns>
    public static IReadOnlyList<T> ShardDataset<T>(IReadOnlyList<T> items, int rank, int worldSize)
    {
        ArgumentNullException.ThrowIfNull(items);
        ArgumentOutOfRangeException.ThrowIfLessThan(worldSize, 1);
        ArgumentOutOfRangeException.ThrowIfNegative(rank);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(rank, worldSize);
        var result = new List<T>((items.Count + worldSize - 1) / worldSize);
        for (int i = rank; i < items.Count; i += worldSize) result.Add(items[i]);
        return result;
    }

    /// <summary>Ends the whole job now (every rank) with <paramref name="code"/>: for a failure the other ranks cannot see.</summary>
    /// <param name="code">The exit code mpirun reports.</param>
    public void Abort(int code = 1)
    {
        if (_mpi is null) Environment.Exit(code);
        _logger.LogCritical("Rank {Rank}: aborting the job (code {Code})", Rank, code);
        _mpi!.Abort(code);
    }

    /// <summary>
    /// Leaves the job: MPI_Finalize after a healthy run; after a failed collective MPI_Abort instead, which ends every
    /// rank (a peer that died or hangs would make MPI_Finalize wait forever).
    /// </summary>
    public void Dispose()
    {
        lock (_gate)
        {
            if (_disposed) return;
            _disposed = true;
            if (_faulted)
            {
                // A timed-out request may still write into the buffer: keep it; the job ends now anyway.
                if (_gradientBuffer is not null) lock (s_orphans) s_orphans.Add(_gradientBuffer);
            }
            else
            {
                _gradientBuffer?.Dispose();
            }
            if (_mpi is null) return;
            if (_faulted)
            {
                _logger.LogCritical("Rank {Rank}: a collective operation failed; aborting the job so no rank waits forever", Rank);
                Console.Error.Flush();
                _mpi.Abort(1);
                return;
            }
            if (!_mpi.IsFinalized) _mpi.Shutdown();
        }
    }

    /// <summary>
    /// A bad argument found on this rank before a collective: the other ranks are entering it, so under MPI the instance
    /// is faulted (Dispose then ends the job at once instead of letting the others wait for the timeout).
    /// </summary>
    private TException Refuse<TException>(TException ex) where TException : Exception
    {
        if (_mpi is not null && WorldSize > 1)
        {
            _faulted = true;
            _logger.LogError(ex, "Rank {Rank}: refused the arguments of a collective operation; the other ranks cannot continue", Rank);
        }
        return ex;
    }

    /// <summary>Buffers of collectives that failed: a timed-out request may still write into them, so they stay alive.</summary>
    private static readonly List<object> s_orphans = [];

    /// <summary>Runs one collective under the lock; any failure inside marks the instance faulted (see <see cref="Dispose"/>).</summary>
    private void Collective(string what, Action action)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (_faulted) throw new DistributedException($"Rank {Rank}: an earlier collective operation failed; the job cannot continue ({what}).");
        if (_inMainProcessAction)
            throw Refuse(new InvalidOperationException($"A collective operation ({what}) was called inside RunOnMainProcess: only rank 0 runs that action, so the other ranks would never join it."));
        lock (_gate)
        {
            _communication.Start();
            try
            {
                action();
            }
            catch (Exception ex)
            {
                _faulted = true;
                _logger.LogError(ex, "Rank {Rank}: {What} failed", Rank, what);
                throw;
            }
            finally
            {
                _communication.Stop();
            }
        }
    }

    /// <summary>The first element of a contiguous CPU tensor that owns its storage (native memory: it does not move).</summary>
    private static unsafe void* Address(Tensor t)
    {
        fixed (byte* p = &System.Runtime.InteropServices.MemoryMarshal.GetReference(t.bytes)) return p;
    }

    /// <summary>One line per tensor: name, type, shape.</summary>
    private static string Layout(IEnumerable<(string Name, Tensor Tensor)> tensors)
    {
        var sb = new StringBuilder();
        foreach (var (name, t) in tensors) sb.Append(name).Append('\t').Append(t.dtype).Append("\t[").AppendJoin(", ", t.shape).Append("]\n");
        return sb.ToString();
    }

    /// <summary>
    /// Compares this rank's layout with the others' through a 48-bit hash (max of h and of −h: equal everywhere iff
    /// max = min); on a difference rank <paramref name="root"/>'s layout text is broadcast so each differing rank can
    /// name its first differing line, then the first differing rank's message is broadcast, and every rank throws it.
    /// </summary>
    private unsafe void VerifySameLayout(string layout, string what, int root)
    {
        var mpi = _mpi!;
        var bytes = Encoding.UTF8.GetBytes(layout);
        var hash = SHA256.HashData(bytes);
        double h = 0;
        for (int i = 0; i < 6; i++) h = h * 256 + hash[i];
        var pair = new[] { h, -h };
        fixed (double* p = pair) mpi.AllreduceInPlace(p, 2, sizeof(double), mpi.Double, mpi.Max, Timeout, $"check of the {what}");
        if (pair[0] == -pair[1]) return;

        var rootBytes = BroadcastBytes(bytes, root, $"check of the {what}");
        var rootLines = Encoding.UTF8.GetString(rootBytes).Split('\n', StringSplitOptions.RemoveEmptyEntries);
        var mine = layout.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        string? difference = null;
        for (int i = 0; i < Math.Max(rootLines.Length, mine.Length) && difference is null; i++)
        {
            string? a = i < rootLines.Length ? rootLines[i] : null, b = i < mine.Length ? mine[i] : null;
            if (a == b) continue;
            difference = (a, b) switch
            {
                (null, _) => $"rank {Rank} has an extra tensor {Describe(b!)} (rank {root} has {rootLines.Length} tensors)",
                (_, null) => $"rank {Rank} lacks {Describe(a)} (it has {mine.Length} tensors, rank {root} has {rootLines.Length})",
                _ => $"rank {Rank} has {Describe(b!)} where rank {root} has {Describe(a)}",
            };
        }
        var first = new[] { difference is null ? double.MaxValue : Rank };
        fixed (double* p = first) mpi.AllreduceInPlace(p, 1, sizeof(double), mpi.Double, mpi.Min, Timeout, $"check of the {what}");
        if (first[0] < WorldSize)
        {
            // Every rank reports the first differing rank's finding: mpirun ends the job when the first rank exits, so
            // the message must not depend on which rank gets to print.
            int source = (int)first[0];
            var text = BroadcastBytes(Rank == source ? Encoding.UTF8.GetBytes(difference!) : Array.Empty<byte>(), source, $"check of the {what}");
            difference = Encoding.UTF8.GetString(text);
        }
        throw new DistributedMismatchException(difference is not null
            ? $"The ranks hold different {what}: {difference}. Every rank must build the same model and adapter."
            : $"The ranks hold different {what}: a rank differs from rank {root}. Every rank must build the same model and adapter.");
    }

    /// <summary>Rank <paramref name="source"/>'s bytes on every rank (its length first); the others pass anything.</summary>
    private unsafe byte[] BroadcastBytes(byte[] mine, int source, string what)
    {
        var mpi = _mpi!;
        var length = new[] { (double)mine.Length };
        fixed (double* p = length) mpi.Broadcast(p, sizeof(double), source, Timeout, what);
        var bytes = Rank == source ? mine : new byte[(int)length[0]];
        fixed (byte* p = bytes) mpi.Broadcast(p, bytes.Length, source, Timeout, what);
        return bytes;
    }

    private static string Describe(string line)
    {
        var parts = line.Split('\t');
        return parts.Length == 3 ? $"'{parts[0]}' {parts[1]} {parts[2]}" : $"'{line}'";
    }
}
