using System.Runtime.InteropServices;
using MinLora;
using TorchSharp;
using static TorchSharp.torch;

namespace MinLora.SaveLoop;

/// <summary>Two adapter versions of different ranks on one small base, rebuilt identically by the child and the test.</summary>
public static class SaveLoopModels
{
    /// <summary>The base model (fixed seed).</summary>
    public static nn.Module<Tensor, Tensor> Base()
    {
        manual_seed(5);
        return nn.Sequential(("fc1", nn.Linear(32, 48)), ("act", nn.Tanh()), ("fc2", nn.Linear(48, 16)));
    }

    /// <summary>The base with adapter version <paramref name="version"/> (0: rank 4, 1: rank 8), every adapter value set.</summary>
    public static nn.Module<Tensor, Tensor> WithAdapter(int version)
    {
        var model = Base();
        model.AddLora(new LoraConfig { TargetModules = new[] { "fc1", "fc2" }, Rank = version == 0 ? 4 : 8, Alpha = 8 });
        using var noGrad = no_grad();
        manual_seed(100 + version);
        foreach (var (_, t) in model.GetLoraStateDict()) t.copy_(randn_like(t));
        return model;
    }
}

internal static class Program
{
    /// <summary>
    /// save-loop DIR: writes version 0, 1, 0, … into DIR until killed; prints "ready" after the first save.
    /// allocator-check: see <see cref="AllocatorCheck"/>.
    /// </summary>
    private static int Main(string[] args)
    {
        if (args is ["allocator-check"]) return AllocatorCheck();
        if (args.Length != 1) { Console.Error.WriteLine("usage: MinLora.SaveLoop DIR | allocator-check"); return 2; }
        var models = new[] { SaveLoopModels.WithAdapter(0), SaveLoopModels.WithAdapter(1) };
        for (long i = 0; ; i++)
        {
            models[i % 2].SaveLoraAdapter(args[0]);
            if (i == 0) Console.WriteLine("ready");
        }
    }

    /// <summary>
    /// On the process's first thread (glibc's main arena, whose blocks glibc maps only by its thresholds; a thread's own
    /// arena maps any block beyond its 64 MiB heap): after <see cref="NativeAllocator.RetainFreedMemory()"/> and then
    /// <see cref="NativeAllocator.RetainFreedMemory(long)"/> at 32 MiB, prints whether a 1 GiB and a 1 MiB block are
    /// mappings of their own (bit 1 of the chunk's size word, IS_MMAPPED), then whether a 1 GiB block is one inside
    /// <see cref="NativeAllocator.ReturnLargeBlocksWhile"/>'s scope (after a nested scope ended) and not after it (every
    /// block kept again):
    /// "applied=True large=True small=False scoped=True restored=True".
    /// </summary>
    private static int AllocatorCheck()
    {
        bool applied = NativeAllocator.RetainFreedMemory() && NativeAllocator.RetainFreedMemory(NativeAllocator.MaxRetainedBlockBytes);
        nint large = Marshal.AllocHGlobal(1 << 30);   // malloc; reserved, never touched
        nint small = Marshal.AllocHGlobal(1 << 20);
        static bool Mapped(nint p) => (Marshal.ReadIntPtr(p, -IntPtr.Size) & 2) != 0;
        // Every block kept, then bounded for a scope only: a 1 GiB block is mapped inside the scope, not after it.
        NativeAllocator.RetainFreedMemory();
        nint inside, after;
        using (NativeAllocator.ReturnLargeBlocksWhile())
        {
            using (NativeAllocator.ReturnLargeBlocksWhile()) { }   // an inner scope ending leaves the outer one's bound
            inside = Marshal.AllocHGlobal(1 << 30);
        }
        after = Marshal.AllocHGlobal(1 << 30);
        Console.WriteLine($"applied={applied} large={Mapped(large)} small={Mapped(small)} scoped={Mapped(inside)} restored={!Mapped(after)}");
        foreach (var p in new[] { small, large, inside, after }) Marshal.FreeHGlobal(p);
        return 0;
    }
}
