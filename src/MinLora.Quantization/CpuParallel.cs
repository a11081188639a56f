using System.Diagnostics;

namespace MinLora.Quantization;

/// <summary>
/// Fork/join for the CPU kernels' short parallel regions: a decoding step of a 6B model runs ~140 of them, each
/// 0.05–3 ms. <see cref="Parallel.For(int, int, Action{int})"/> wakes a thread-pool thread for each: measured on the
/// 2-core Xeon VM after 300 µs of serial work, the second thread started ~25 µs late and a region of 4 × 20 µs items
/// took 72 µs instead of 40. Here one resident worker per additional core spins for a short while after each
/// region (<see cref="SpinTime"/>) and then sleeps, so the next region usually starts at once.
/// </summary>
/// <remarks>
/// Items are claimed one at a time from a shared counter (the calling thread works too), so a core taken by another
/// process delays only the item it holds. One region runs at a time: a call made while another thread's region runs,
/// or from inside an item, goes to <see cref="Parallel.For(int, int, Action{int})"/> instead. Exceptions thrown by
/// items are rethrown to the caller in an <see cref="AggregateException"/>, as <c>Parallel.For</c> does.
/// </remarks>
internal static class CpuParallel
{
    /// <summary>How long an idle worker spins before it sleeps: longer than the serial work between two regions of a
    /// decoding step (10–100 µs), far shorter than anything a user would notice as a busy core.</summary>
    internal static readonly TimeSpan SpinTime = TimeSpan.FromMicroseconds(300);

    private static readonly object Gate = new();
    private static readonly object SleepLock = new();
    private static readonly long SpinTicks = (long)(SpinTime.TotalSeconds * Stopwatch.Frequency);
    private static Region? s_current;
    private static int s_sleepers;
    private static bool s_started;

    [ThreadStatic]
    private static bool t_busy;

    private sealed class Region(Action<int> body, int count)
    {
        private readonly int _count = count;
        private int _next;
        private int _remaining = count;
        private Exception? _error;

        public bool Done => Volatile.Read(ref _remaining) == 0;

        public Exception? Error => Volatile.Read(ref _error);

        public void Work()
        {
            int i;
            while ((i = Interlocked.Increment(ref _next) - 1) < _count)
            {
                try
                {
                    body(i);
                }
                catch (Exception e)
                {
                    Interlocked.CompareExchange(ref _error, e, null);
                }
                Interlocked.Decrement(ref _remaining);
            }
        }
    }

    /// <summary>Runs <paramref name="body"/>(0 … <paramref name="count"/> − 1) on all cores and returns when every item is done.</summary>
    internal static void For(int count, Action<int> body)
    {
        if (count <= 0) return;
        if (count == 1 || Environment.ProcessorCount == 1)
        {
            for (int i = 0; i < count; i++) body(i);
            return;
        }
        if (t_busy || !Monitor.TryEnter(Gate))
        {
            Parallel.For(0, count, body);
            return;
        }
        try
        {
            StartWorkers();
            var region = new Region(body, count);
            Interlocked.Exchange(ref s_current, region);                  // publish (a full fence) …
            if (Volatile.Read(ref s_sleepers) > 0)                        // … before looking for sleepers
            {
                lock (SleepLock) Monitor.PulseAll(SleepLock);
            }
            t_busy = true;
            try
            {
                region.Work();
            }
            finally
            {
                t_busy = false;
            }
            var spin = new SpinWait();
            while (!region.Done) spin.SpinOnce(sleep1Threshold: -1);
            if (region.Error is { } error) throw new AggregateException(error);
        }
        finally
        {
            Monitor.Exit(Gate);
        }
    }

    private static void StartWorkers()
    {
        if (s_started) return;
        s_started = true;
        for (int w = 1; w < Environment.ProcessorCount; w++)
            new Thread(WorkerLoop) { IsBackground = true, Name = "MinLora CPU kernels" }.Start();
    }

    private static void WorkerLoop()
    {
        t_busy = true;   // a region started from inside an item runs on Parallel.For
        Region? seen = null;
        while (true)
        {
            var region = Volatile.Read(ref s_current);
            if (region != seen)
            {
                seen = region;
                region!.Work();
                continue;
            }
            long start = Stopwatch.GetTimestamp();
            while (Volatile.Read(ref s_current) == seen && Stopwatch.GetTimestamp() - start < SpinTicks) Thread.SpinWait(20);
            if (Volatile.Read(ref s_current) != seen) continue;
            lock (SleepLock)
            {
                Interlocked.Increment(ref s_sleepers);                    // a full fence before the check below
                while (Volatile.Read(ref s_current) == seen) Monitor.Wait(SleepLock);
                Interlocked.Decrement(ref s_sleepers);
            }
        }
    }
}
