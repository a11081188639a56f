using TorchSharp;
using static TorchSharp.torch;

namespace MinLora.Quantization.Tests;

/// <summary>
/// <see cref="CpuMemory.UseHugePages(nn.Module)"/>: a request to the operating system that must never change a value or
/// an address, must cover only whole 2 MiB pages inside each large tensor, and must leave small, non-contiguous and
/// non-CPU tensors alone.
/// </summary>
public class CpuMemoryTests
{
    private const long HugePage = 2L << 20;

    [Fact]
    public void LargeParameters_KeepTheirValuesAndAddresses_AndOnlyWholeInteriorPagesAreAdvised()
    {
        manual_seed(301);
        // 4097 × 1000 floats ≈ 16.4 MB: large enough, and (almost surely) not 2 MiB-aligned at either end.
        using var large = nn.Linear(1000, 4097);
        using var small = nn.Linear(100, 100);
        using var module = nn.Sequential(("large", large), ("small", small));
        using var before = large.weight!.detach().clone();
        using var smallBefore = small.weight!.detach().clone();
        var address = TensorMemory.Pointer(large.weight!);

        long placed = module.UseHugePages();

        Assert.True(T.Identical(before, large.weight!.detach()));
        Assert.True(T.Identical(smallBefore, small.weight!.detach()));
        Assert.Equal(address, TensorMemory.Pointer(large.weight!));
        if (!CpuMemory.IsSupported)
        {
            Assert.Equal(0, placed);
            return;
        }
        // Only the large weight qualifies (its bias and the small layer are under MinimumBytes); madvise takes the
        // 2 MiB-aligned interior: the tensor's bytes rounded in at both ends, a whole number of huge pages.
        long bytes = large.weight.numel() * 4;
        long start = (long)address, first = (start + HugePage - 1) & ~(HugePage - 1), end = (start + bytes) & ~(HugePage - 1);
        Assert.Equal(end - first, placed);
        Assert.Equal(0, placed % HugePage);
        Assert.InRange(placed, bytes - 2 * HugePage, bytes);
    }

    [Fact]
    public void SmallNonContiguousAndMetaTensors_AreLeftAlone()
    {
        using var small = zeros(1000, 1000);                 // 4,000,000 bytes: below MinimumBytes (4 MiB)
        Assert.Equal(0, CpuMemory.UseHugePages(small));
        using var big = zeros(2048, 2048);                   // 16 MiB
        using var transposed = big.t();
        Assert.Equal(0, CpuMemory.UseHugePages(transposed)); // not contiguous
        using var meta = empty(new long[] { 4096, 4096 }, device: new Device(DeviceType.META));
        Assert.Equal(0, CpuMemory.UseHugePages(meta));
    }

    [SkippableFact]
    public void SharedStorage_IsCountedOnce()
    {
        Skip.IfNot(CpuMemory.IsSupported, "needs Linux transparent huge pages");
        using var a = nn.Linear(2048, 2048, hasBias: false);
        using var b = nn.Linear(2048, 2048, hasBias: false);
        b.weight = a.weight; // tied, as a GLM head tied to its embedding
        using var module = nn.Sequential(("a", a), ("b", b));
        long once = CpuMemory.UseHugePages(a.weight!);
        Assert.True(once > 0);
        Assert.Equal(once, module.UseHugePages());
    }

    [Fact]
    public void NullArguments_Throw()
    {
        Assert.Throws<ArgumentNullException>(() => CpuMemory.UseHugePages((nn.Module)null!));
        Assert.Throws<ArgumentNullException>(() => CpuMemory.UseHugePages((Tensor)null!));
    }

    [SkippableFact]
    public void LargeQuantizedLayer_OnTheCpuKernel_IsPlacedAndStillEqualsTheDequantizedProduct()
    {
        Skip.IfNot(CpuGemv.IsSupported, "needs AVX-512 F/BW (elsewhere libtorch's kernels run, covered by QuantizedLinearTests)");
        manual_seed(302);
        // int8 4100 × 2048: 8.4 MB of codes, placed after quantization; N not a multiple of the kernel's blocks.
        using var linear = nn.Linear(2048, 4100);
        // float32 activations: this test is about placement, so the product is the exact-values one.
        using var q = QuantizedLinear.FromLinear(linear, QuantizationFormat.Int8PerRow, 128, new QuantizedLinearOptions { Int8Activations = false });
        Assert.Equal(QuantizedKernel.CpuGemv, q.Kernel);
        long placed = q.UseHugePages();
        if (CpuMemory.IsSupported) Assert.InRange(placed, 4100L * 2048 - 2 * (2L << 20), 4100L * 2048);
        using var x = randn(3, 2048);
        using var y = q.call(x);
        using var deq = q.Dequantize(ScalarType.Float64);
        using var reference = x.to(ScalarType.Float64).matmul(deq.t()).add(linear.bias!.to(ScalarType.Float64));
        // float32 accumulation over 2048 terms: relative to Σ|x·w| the error is below 1e-5 (as in CpuGemvTests).
        using var bound = x.to(ScalarType.Float64).abs().matmul(deq.abs().t()).mul(1e-5).add(1e-6);
        using var excess = (y.to(ScalarType.Float64) - reference).abs() - bound;
        Assert.True(excess.max().item<double>() <= 0);
    }

    [Fact]
    public void PointerOfATensorOverTwoGigabytes_IsItsFirstElement()
    {
        // TorchSharp's byte span stops at int.MaxValue bytes; the address must still come out (as a GLM-4 float32
        // embedding needs). empty() reserves the memory without touching it, so this costs no RSS.
        using var big = empty(new long[] { (long)int.MaxValue + 4097 }, dtype: ScalarType.Byte);
        nint start = TensorMemory.Pointer(big);
        using var head = big.narrow(0, 0, 16);
        using var later = big.narrow(0, 4096, 16);
        Assert.Equal(TensorMemory.Pointer(head), start);
        Assert.Equal(start + 4096, TensorMemory.Pointer(later));
    }
}
