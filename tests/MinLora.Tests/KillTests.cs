using System.Diagnostics;
using MinLora.SaveLoop;
using static TorchSharp.torch;

namespace MinLora.Tests;

/// <summary>
/// A child process saves two adapter versions (rank 4 and rank 8) into one directory in a loop and is killed with
/// SIGKILL at random moments, 30 times: after every kill the directory loads, strictly, as exactly one of the two
/// versions (never a config of one rank beside the weights of the other), and the next save leaves no leftovers.
/// </summary>
public sealed class KillTests : IDisposable
{
    private readonly string _dir = Path.Combine(Path.GetTempPath(), "minlora-kill-" + Guid.NewGuid().ToString("N"));

    public void Dispose()
    {
        if (Directory.Exists(_dir)) Directory.Delete(_dir, true);
    }

    [Fact]
    public async Task AdapterSaves_KilledAtRandom_AlwaysLoadAsOneWholeVersion()
    {
        Directory.CreateDirectory(_dir);
        var target = Path.Combine(_dir, "adapter");
        var versions = new[] { SaveLoopModels.WithAdapter(0), SaveLoopModels.WithAdapter(1) }.Select(m => m.GetLoraStateDict()).ToArray();
        var rng = new Random(77);
        var seen = new int[2];
        for (int kill = 0; kill < 30; kill++)
        {
            var psi = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true };
            psi.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "MinLora.SaveLoop.dll"));
            psi.ArgumentList.Add(target);
            using var child = Process.Start(psi)!;
            _ = child.StandardError.ReadToEndAsync();
            var ready = await child.StandardOutput.ReadLineAsync().WaitAsync(TimeSpan.FromSeconds(60));
            Assert.Equal("ready", ready);
            await Task.Delay(rng.Next(0, 250));
            child.Kill(entireProcessTree: true); // SIGKILL on Linux
            child.WaitForExit();

            using var fresh = SaveLoopModels.Base();
            fresh.LoadLoraAdapter(target);
            var loaded = fresh.GetLoraStateDict();
            int match = Array.FindIndex(versions, v => v.Count == loaded.Count && v.All(kv => loaded.TryGetValue(kv.Key, out var t) && t.shape.SequenceEqual(kv.Value.shape) && t.allclose(kv.Value, 0, 0)));
            Assert.True(match >= 0, $"after kill {kill} the directory holds neither version");
            seen[match]++;
        }
        // Both versions were caught on disk (the kills landed at different points of the loop).
        Assert.True(seen[0] > 0 && seen[1] > 0, $"versions seen: {seen[0]} and {seen[1]}");
        // The next save cleans what killed writers left beside the directory.
        SaveLoopModels.WithAdapter(0).SaveLoraAdapter(target);
        Assert.Equal(new[] { "adapter" }, Directory.GetFileSystemEntries(_dir).Select(Path.GetFileName));
    }
}
