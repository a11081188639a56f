using TorchSharp;
using static TorchSharp.torch;

namespace MinLora.Tests;

/// <summary>Proves that the build's libLibTorchSharp.so fix works: TorchSharp initialises and computes.</summary>
public class TorchSharpLoadTests
{
    [Fact]
    public void TorchSharp_Initialises_And_Computes()
    {
        using var a = tensor(new float[] { 1, 2, 3, 4 }).reshape(2, 2);
        using var b = a.matmul(a);
        Assert.Equal(new float[] { 7, 10, 15, 22 }, b.data<float>().ToArray());
        Assert.True(torch.get_num_threads() >= 1);
    }
}
