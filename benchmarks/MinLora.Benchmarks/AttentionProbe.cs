using System.Diagnostics;
using static TorchSharp.torch;

/// <summary>Which form of the decode-step attention products reads a strided cache without copying it (timing probe).</summary>
internal static class AttentionProbe
{
    public static void Run()
    {
        using var noGrad = no_grad();
        long bh = 32, hd = 128, cap = 1280, sk = 1025;
        var keys = randn(new[] { 1L, bh, cap, hd }).to(ScalarType.BFloat16);
        var values = randn(new[] { 1L, bh, cap, hd }).to(ScalarType.BFloat16);
        var q = randn(new[] { bh, 1L, hd }).to(ScalarType.BFloat16);
        var ks = keys.narrow(2, 0, sk).reshape(bh, sk, hd);
        var vs = values.narrow(2, 0, sk).reshape(bh, sk, hd);
        var probs = randn(new[] { bh, 1L, sk }).softmax(-1).to(ScalarType.BFloat16);
        void T(string name, Func<Tensor> f)
        {
            for (int i = 0; i < 3; i++) f().Dispose();
            var sw = Stopwatch.StartNew();
            for (int i = 0; i < 28; i++) f().Dispose();
            Console.WriteLine($"{name}: {sw.Elapsed.TotalMilliseconds:F1} ms per 28 layers");
        }
        T("scores q·Kᵀ (bmm, strided K)", () => q.bmm(ks.transpose(1, 2)));
        T("scores K·q (bmm, strided K)", () => ks.bmm(q.transpose(1, 2)));
        T("scores K·q float32 accumulate via matmul", () => ks.matmul(q.transpose(1, 2)));
        T("context P·V (bmm, strided V)", () => probs.bmm(vs));
        T("context Vᵀ·Pᵀ", () => vs.transpose(1, 2).bmm(probs.transpose(1, 2)));
        var ksc = ks.contiguous();
        var vsc = vs.contiguous();
        T("scores q·Kᵀ contiguous K", () => q.bmm(ksc.transpose(1, 2)));
        T("context P·V contiguous V", () => probs.bmm(vsc));
        T("copy K contiguous", () => ks.contiguous());
    }
}
