namespace MinLora.Quantization.Tests;

/// <summary>The kernels' fork/join: every item exactly once, errors surfaced, nested and concurrent calls served.</summary>
public class CpuParallelTests
{
    [Fact]
    public void EveryItem_RunsExactlyOnce()
    {
        for (int round = 0; round < 300; round++)
        {
            int count = 1 + round % 17;
            var hits = new int[count];
            CpuParallel.For(count, i => Interlocked.Increment(ref hits[i]));
            Assert.All(hits, h => Assert.Equal(1, h));
            if (round % 50 == 0) Thread.Sleep(2);   // past the workers' spin: they must wake from sleep too
        }
        CpuParallel.For(0, _ => throw new InvalidOperationException("no items, no calls"));
    }

    [Fact]
    public void ReturnsOnlyWhenEveryItemIsDone()
    {
        for (int round = 0; round < 20; round++)
        {
            int done = 0, count = 2 + round % 3;
            CpuParallel.For(count, _ =>
            {
                Thread.Sleep(2);   // the other thread's items finish after the caller's own
                Interlocked.Increment(ref done);
            });
            Assert.Equal(count, Volatile.Read(ref done));
        }
    }

    [Fact]
    public void AnItemsException_ReachesTheCaller_AndTheNextRegionRuns()
    {
        var ran = new int[8];
        var error = Assert.Throws<AggregateException>(() => CpuParallel.For(8, i =>
        {
            Interlocked.Increment(ref ran[i]);
            if (i == 5) throw new InvalidOperationException("item 5");
        }));
        Assert.Equal("item 5", Assert.IsType<InvalidOperationException>(error.InnerException).Message);
        Assert.All(ran, r => Assert.Equal(1, r));   // the other items still ran
        int sum = 0;
        CpuParallel.For(8, i => Interlocked.Add(ref sum, i));
        Assert.Equal(28, sum);
    }

    [Fact]
    public void NestedAndConcurrentCalls_AllComplete()
    {
        long total = 0;
        var threads = Enumerable.Range(0, 4).Select(_ => new Thread(() =>
        {
            for (int r = 0; r < 100; r++)
                CpuParallel.For(4, i => CpuParallel.For(3, j => Interlocked.Add(ref total, 10 * i + j + 1)));
        })).ToArray();
        foreach (var t in threads) t.Start();
        foreach (var t in threads) t.Join();
        // Per outer call: Σ_i Σ_j (10i + j + 1) = 3·10·(0+1+2+3) + 4·(1+2+3) = 180 + 24 = 204.
        Assert.Equal(4L * 100 * 204, total);
    }
}
