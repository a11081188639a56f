using MinLora.Distributed;
using TorchSharp;
using static TorchSharp.torch;

namespace MinLora.Distributed.Tests;

/// <summary>The parts that need no MPI: sharding arithmetic, single-process behaviour, argument checks.</summary>
public sealed class SingleProcessTests
{
    [Theory]
    [InlineData(0, 1)]
    [InlineData(5, 2)]
    [InlineData(7, 3)]
    [InlineData(2, 4)]
    [InlineData(1000, 7)]
    public void ShardRange_CoversEveryItemOnceInOrder_SharesDifferByAtMostOne(int count, int world)
    {
        var seen = new List<int>();
        var sizes = new List<int>();
        for (int r = 0; r < world; r++)
        {
            var (start, n) = DataParallel.ShardRange(count, r, world);
            Assert.Equal(seen.Count, start); // contiguous, rank after rank
            seen.AddRange(Enumerable.Range(start, n));
            sizes.Add(n);
        }
        Assert.Equal(Enumerable.Range(0, count), seen);
        Assert.True(sizes.Max() - sizes.Min() <= 1);
        Assert.True(sizes.SequenceEqual(sizes.OrderByDescending(s => s)), "lower ranks take the extra items");
    }

    [Fact]
    public void ShardRange_BadArguments_Throw()
    {
        Assert.Throws<ArgumentOutOfRangeException>(() => DataParallel.ShardRange(-1, 0, 2));
        Assert.Throws<ArgumentOutOfRangeException>(() => DataParallel.ShardRange(4, 2, 2));
        Assert.Throws<ArgumentOutOfRangeException>(() => DataParallel.ShardRange(4, -1, 2));
        Assert.Throws<ArgumentOutOfRangeException>(() => DataParallel.ShardRange(4, 0, 0));
    }

    [Fact]
    public void SingleProcess_CollectivesLeaveEverythingAsItIs()
    {
        using var dp = DataParallel.Initialize(new DataParallelOptions { Mode = DataParallelMode.SingleProcess });
        Assert.Equal((0, 1, true, false), (dp.Rank, dp.WorldSize, dp.IsMainProcess, dp.UsesMpi));

        using var p = nn.Parameter(randn(3, 4));
        p.grad = randn(3, 4);
        var before = p.grad.clone();
        Assert.Equal(7.0, dp.AverageGradients([p], 7));
        Assert.True(p.grad.allclose(before, 0, 0), "single-process gradients are left bit for bit");

        Span<double> metrics = [1.5, 2];
        dp.AllreduceSum(metrics);
        Assert.Equal([1.5, 2.0], metrics.ToArray());
        Assert.Equal(3.25, dp.AllreduceSum(3.25));

        var items = Enumerable.Range(0, 9).ToList();
        Assert.Equal(items, dp.ShardBatch(items));
        Assert.Equal(items, dp.ShardDataset(items));

        int ran = 0;
        dp.RunOnMainProcess(() => ran++, "work");
        Assert.Equal(1, ran);
        var thrown = Assert.Throws<IOException>(() => dp.RunOnMainProcess(() => throw new IOException("disk full"), "saving"));
        Assert.Equal("disk full", thrown.Message);
        dp.Barrier();
    }

    [Fact]
    public void AverageGradients_BadWeight_Throws()
    {
        using var dp = DataParallel.Initialize(new DataParallelOptions { Mode = DataParallelMode.SingleProcess });
        using var p = nn.Parameter(randn(2));
        Assert.Throws<ArgumentOutOfRangeException>(() => dp.AverageGradients([p], -1));
        Assert.Throws<ArgumentOutOfRangeException>(() => dp.AverageGradients([p], double.NaN));
        Assert.Throws<ArgumentOutOfRangeException>(() => dp.AverageGradients([p], double.PositiveInfinity));
        Assert.Throws<ArgumentNullException>(() => dp.AverageGradients(null!));
        Assert.Throws<ArgumentOutOfRangeException>(() => DataParallel.Initialize(new DataParallelOptions { Timeout = TimeSpan.Zero }));
    }

    [Theory]
    [InlineData(10, 4)]
    [InlineData(3, 5)]
    [InlineData(0, 2)]
    public void ShardDataset_EveryItemGoesToExactlyOneRank(int count, int world)
    {
        var items = Enumerable.Range(0, count).ToList();
        var parts = Enumerable.Range(0, world).Select(r => DataParallel.ShardDataset(items, r, world)).ToList();
        Assert.Equal(items, parts.SelectMany(x => x).Order());
        for (int r = 0; r < world; r++) Assert.All(parts[r], i => Assert.Equal(r, i % world));
        using var dp = DataParallel.Initialize(new DataParallelOptions { Mode = DataParallelMode.SingleProcess });
        Assert.Equal(items, dp.ShardDataset(items));
    }
}
