using System.Text;
using TorchSharp;
using TorchSharp.PyBridge;
using static TorchSharp.torch;

namespace MinLora.Tests;

/// <summary>
/// Files a user can lose or get wrong: all-or-nothing directory writes, safetensors headers checked before any
/// data is read (a fuzz over mutated and truncated files), adapter configs of the wrong types, non-finite adapters
/// and merges, and the book's own minLoRA <c>lora.pth</c> against the float64 formula.
/// </summary>
public sealed class RobustFilesTests : IDisposable
{
    private readonly string _dir = Path.Combine(Path.GetTempPath(), "minlora-robust-" + Guid.NewGuid().ToString("N"));

    public RobustFilesTests() => Directory.CreateDirectory(_dir);

    public void Dispose()
    {
        if (Directory.Exists(_dir)) Directory.Delete(_dir, true);
    }

    [Fact]
    public void AtomicDirectory_ReplacesWhole_KeepsOtherFiles_AndAFailedWriteChangesNothing()
    {
        var target = Path.Combine(_dir, "adapter");
        AtomicDirectory.Write(target, s => File.WriteAllText(Path.Combine(s, "a.txt"), "v1"));
        File.WriteAllText(Path.Combine(target, "README.md"), "mine");
        AtomicDirectory.Write(target, s =>
        {
            File.WriteAllText(Path.Combine(s, "a.txt"), "v2");
            File.WriteAllText(Path.Combine(s, "b.txt"), "v2");
        });
        Assert.Equal("v2", File.ReadAllText(Path.Combine(target, "a.txt")));
        Assert.Equal("v2", File.ReadAllText(Path.Combine(target, "b.txt")));
        Assert.Equal("mine", File.ReadAllText(Path.Combine(target, "README.md")));

        var ex = Assert.Throws<InvalidOperationException>(() => AtomicDirectory.Write(target, s =>
        {
            File.WriteAllText(Path.Combine(s, "a.txt"), "v3");
            throw new InvalidOperationException("disk full");
        }));
        Assert.Equal("disk full", ex.Message);
        Assert.Equal("v2", File.ReadAllText(Path.Combine(target, "a.txt")));
        Assert.Single(Directory.GetDirectories(_dir)); // no staging leftover
    }

    [Fact]
    public void AtomicDirectory_PutsBackAVersionLeftAside_AndRemovesDeadStaging()
    {
        var target = Path.Combine(_dir, "out");
        // An interrupted two-rename swap by a process that no longer runs: the old version aside, no target.
        int dead = DeadPid();
        var aside = target + $".minlora-{dead}-0123.old";
        Directory.CreateDirectory(aside);
        File.WriteAllText(Path.Combine(aside, "a.txt"), "old");
        var staging = target + $".minlora-{dead}-4567.staging";
        Directory.CreateDirectory(staging);
        File.WriteAllText(Path.Combine(staging, "a.txt"), "half");
        AtomicDirectory.Recover(target);
        Assert.Equal("old", File.ReadAllText(Path.Combine(target, "a.txt")));
        Assert.False(Directory.Exists(staging));
        Assert.Single(Directory.GetDirectories(_dir));
    }

    [Fact]
    [System.Runtime.Versioning.UnsupportedOSPlatform("windows")]
    public void AtomicDirectory_CarriesLinksAsLinks_ReadOnlyFiles_AndHonoursTheFilter()
    {
        var target = Path.Combine(_dir, "t");
        var outside = Path.Combine(_dir, "dataset");
        Directory.CreateDirectory(outside);
        File.WriteAllText(Path.Combine(outside, "big.txt"), "data");
        AtomicDirectory.Write(target, s => File.WriteAllText(Path.Combine(s, "a.txt"), "v1"));
        Directory.CreateSymbolicLink(Path.Combine(target, "data"), outside);
        File.WriteAllText(Path.Combine(target, "readme.txt"), "mine");
        File.SetUnixFileMode(Path.Combine(target, "readme.txt"), UnixFileMode.UserRead);
        File.WriteAllText(Path.Combine(target, "stale.index.json"), "{}");
        AtomicDirectory.Write(target, s => File.WriteAllText(Path.Combine(s, "a.txt"), "v2"), rel => !rel.EndsWith(".index.json", StringComparison.Ordinal));
        Assert.Equal("v2", File.ReadAllText(Path.Combine(target, "a.txt")));
        Assert.Equal("mine", File.ReadAllText(Path.Combine(target, "readme.txt")));
        Assert.Equal(outside, new DirectoryInfo(Path.Combine(target, "data")).LinkTarget);
        Assert.False(File.Exists(Path.Combine(target, "stale.index.json")));
        File.SetUnixFileMode(Path.Combine(target, "readme.txt"), UnixFileMode.UserRead | UnixFileMode.UserWrite);
    }

    [Fact]
    public void AtomicDirectory_RefusesAFileAsTarget()
    {
        var file = Path.Combine(_dir, "f");
        File.WriteAllText(file, "x");
        Assert.Throws<IOException>(() => AtomicDirectory.Write(file, _ => { }));
        Assert.Equal("x", File.ReadAllText(file));
    }

    private static int DeadPid()
    {
        using var p = System.Diagnostics.Process.Start(new System.Diagnostics.ProcessStartInfo("true"))!;
        p.WaitForExit();
        return p.Id;
    }

    private static byte[] ValidSafetensors(string path)
    {
        Safetensors.SaveStateDict(path, new Dictionary<string, Tensor>
        {
            ["a"] = arange(12, dtype: ScalarType.Float32).reshape(3, 4),
            ["b"] = ones(5, dtype: ScalarType.BFloat16),
            ["c"] = zeros(new long[] { 2, 0 }),
        });
        return File.ReadAllBytes(path);
    }

    private static byte[] WithHeader(string json, int dataBytes)
    {
        var h = Encoding.UTF8.GetBytes(json);
        var bytes = new byte[8 + h.Length + dataBytes];
        BitConverter.GetBytes((ulong)h.Length).CopyTo(bytes, 0);
        h.CopyTo(bytes, 8);
        return bytes;
    }

    [Theory]
    [InlineData("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 12, "overlaps")]
    [InlineData("{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", 8, "outside")]
    [InlineData("{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 8, "needs 12 bytes")]
    [InlineData("{\"a\":{\"dtype\":\"Q7\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, "unknown dtype")]
    [InlineData("{\"a\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", 8, "bad dimension")]
    [InlineData("{\"a\":{\"dtype\":\"F32\",\"shape\":[4611686018427387904,4],\"data_offsets\":[0,8]}}", 8, "too large")]
    [InlineData("{\"a\":{\"dtype\":\"U8\",\"shape\":[100],\"data_offsets\":[0,100]},\"b\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[10,10]},\"c\":{\"dtype\":\"U8\",\"shape\":[10],\"data_offsets\":[50,60]}}", 100, "overlaps")]
    [InlineData("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[\"0\",4]}}", 4, "data_offsets")]
    [InlineData("{\"a\":[1,2]}", 0, "not an object")]
    [InlineData("[1,2]", 0, "not a JSON object")]
    [InlineData("{\"a\":", 0, "not valid JSON")]
    public void SafetensorsHeader_RefusesInconsistentFiles_NamingFileAndKey(string header, int dataBytes, string expected)
    {
        var path = Path.Combine(_dir, "bad.safetensors");
        File.WriteAllBytes(path, WithHeader(header, dataBytes));
        var ex = Assert.Throws<InvalidDataException>(() => SafetensorsHeader.Read(path));
        Assert.Contains(expected, ex.Message, StringComparison.Ordinal);
        Assert.Contains(path, ex.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void SafetensorsHeader_TinyOrGarbageFiles_SayWhatIsWrong()
    {
        var path = Path.Combine(_dir, "tiny.safetensors");
        File.WriteAllBytes(path, new byte[] { 1, 2, 3, 4, 5 });
        Assert.Contains("too short", Assert.Throws<InvalidDataException>(() => SafetensorsHeader.Read(path)).Message, StringComparison.Ordinal);
        File.WriteAllBytes(path, Encoding.ASCII.GetBytes("this is not a safetensors file at all"));
        Assert.Contains("does not fit the file", Assert.Throws<InvalidDataException>(() => SafetensorsHeader.Read(path)).Message, StringComparison.Ordinal);
    }

    /// <summary>
    /// 10,000 mutations of a valid file (random bytes changed in the header or data, random truncations): the header
    /// check either accepts the file, and then every entry's range lies inside the file, or refuses it with
    /// InvalidDataException — never another exception.
    /// </summary>
    [Fact]
    public void SafetensorsHeader_Fuzz_OnlyDocumentedOutcomes()
    {
        var path = Path.Combine(_dir, "valid.safetensors");
        var valid = ValidSafetensors(path);
        Assert.Equal(3, SafetensorsHeader.Read(path).Count);
        var rng = new Random(1234);
        int refused = 0, accepted = 0;
        var clock = System.Diagnostics.Stopwatch.StartNew();
        for (int i = 0; i < 10_000 && clock.Elapsed < TimeSpan.FromSeconds(60); i++)
        {
            byte[] bytes;
            if (rng.Next(4) == 0)
            {
                bytes = valid[..rng.Next(valid.Length)];
            }
            else
            {
                bytes = (byte[])valid.Clone();
                int headerEnd = Math.Min(bytes.Length, 8 + (int)BitConverter.ToUInt64(valid, 0));
                for (int m = rng.Next(1, 4); m > 0; m--)
                {
                    int at = rng.Next(3) == 0 ? rng.Next(bytes.Length) : rng.Next(headerEnd);
                    bytes[at] = rng.Next(3) switch { 0 => (byte)rng.Next(256), 1 => (byte)"0123456789"[rng.Next(10)], _ => (byte)"[]{},:\"-"[rng.Next(8)] };
                }
            }
            File.WriteAllBytes(path, bytes);
            try
            {
                var entries = SafetensorsHeader.Read(path);
                long data = bytes.Length - 8 - (long)BitConverter.ToUInt64(bytes, 0);
                Assert.All(entries, e => Assert.True(e.Begin >= 0 && e.End >= e.Begin && e.End <= data));
                accepted++;
            }
            catch (InvalidDataException)
            {
                refused++;
            }
        }
        Assert.True(refused > 1000, $"only {refused} mutations refused");
        Assert.True(accepted > 0, "no mutation kept a valid header (the fuzz does not reach the checks behind parsing)");
    }

    private static string WriteAdapter(string dir, string configJson, Dictionary<string, Tensor> tensors)
    {
        Directory.CreateDirectory(dir);
        File.WriteAllText(Path.Combine(dir, LoraAdapterFiles.ConfigFileName), configJson);
        Safetensors.SaveStateDict(Path.Combine(dir, LoraAdapterFiles.WeightsFileName), tensors);
        return dir;
    }

    private static Dictionary<string, Tensor> ToyAdapterTensors(float fill = 0.01f) => new()
    {
        ["base_model.model.fc1.lora_A.weight"] = full(new long[] { 4, 16 }, fill),
        ["base_model.model.fc1.lora_B.weight"] = full(new long[] { 24, 4 }, fill),
    };

    [Theory]
    [InlineData("{\"r\":4,\"lora_alpha\":8,\"target_modules\":[null]}", "target_modules[0]")]
    [InlineData("{\"r\":\"four\",\"target_modules\":[\"fc1\"]}", "'r' has the wrong type")]
    [InlineData("{\"r\":4,\"lora_alpha\":[8],\"target_modules\":[\"fc1\"]}", "'lora_alpha' has the wrong type")]
    [InlineData("{\"r\":0,\"target_modules\":[\"fc1\"]}", "'r' must be in [1, 65536]")]
    [InlineData("{\"r\":2000000000,\"target_modules\":[\"fc1\"]}", "'r' must be in [1, 65536]")]
    [InlineData("{\"r\":4,\"target_modules\":[\"fc1\"],\"rank_pattern\":{\"fc1\":2.5}}", "must be an integer")]
    [InlineData("{\"r\":4,\"lora_dropout\":1.5,\"target_modules\":[\"fc1\"]}", "lora_dropout")]
    [InlineData("{\"r\":4,\"target_modules\":[\"fc1\"],\"rank_pattern\":{\"fc1\":\"x\"}}", "rank_pattern['fc1']")]
    [InlineData("{\"r\":4,\"use_dora\":\"yes\",\"target_modules\":[\"fc1\"]}", "'use_dora' has the wrong type")]
    public void AdapterConfig_WrongTypes_GiveInvalidDataNamingFileAndKey(string config, string expected)
    {
        using var model = new ToyNet();
        var before = Snapshot.Clone(model);
        var dir = WriteAdapter(Path.Combine(_dir, "bad"), config, ToyAdapterTensors());
        var ex = Assert.Throws<InvalidDataException>(() => model.LoadLoraAdapter(dir));
        Assert.Contains(expected, ex.Message, StringComparison.Ordinal);
        Assert.Contains(LoraAdapterFiles.ConfigFileName, ex.Message, StringComparison.Ordinal);
        Assert.Empty(model.GetLoraAdapterNames());
        Snapshot.AssertEqual(before, Snapshot.Clone(model));
    }

    [Fact]
    public void NonFiniteAdapter_IsRefusedUnlessAllowed()
    {
        using var model = new ToyNet();
        var tensors = ToyAdapterTensors();
        tensors["base_model.model.fc1.lora_B.weight"][3, 1] = tensor(float.NaN);
        var dir = WriteAdapter(Path.Combine(_dir, "nan"), "{\"r\":4,\"lora_alpha\":8,\"target_modules\":[\"fc1\"]}", tensors);
        var ex = Assert.Throws<InvalidDataException>(() => model.LoadLoraAdapter(dir));
        Assert.Contains("lora_B", ex.Message, StringComparison.Ordinal);
        Assert.Empty(model.GetLoraAdapterNames());
        Assert.Single(model.LoadLoraAdapter(dir, allowNonFinite: true));
    }

    [Fact]
    public void MergeLora_WithANonFiniteLaterLayer_ChangesNoWeight()
    {
        using var model = new ToyNet();
        model.AddLora(new LoraConfig { TargetModules = new[] { "fc1", "fc2" }, Rank = 2 });
        using (no_grad())
        {
            foreach (var (name, p) in model.named_parameters())
                if (name.StartsWith("fc2.", StringComparison.Ordinal) && name.Contains("lora_B", StringComparison.Ordinal)) p[0, 0] = tensor(float.PositiveInfinity);
        }
        var poisoned = Snapshot.Clone(model);
        var ex = Assert.Throws<InvalidOperationException>(() => model.MergeLora());
        Assert.Contains("fc2", ex.Message, StringComparison.Ordinal);
        Snapshot.AssertEqual(poisoned, Snapshot.Clone(model));
        Assert.Equal(2, model.GetLoraLayers().Count);
    }

    /// <summary>
    /// The book's file: minLoRA's keys (<c>…parametrizations.weight.0.lora_A</c> [r, in], <c>lora_B</c> [out, r])
    /// pickled as torch.save does; outputs against x·Wᵀ + b + (alpha/r)·x·Aᵀ·Bᵀ in float64, per layer rank from the file.
    /// </summary>
    [Theory]
    [InlineData(true, 1.0)]
    [InlineData(false, 16.0)]
    public void BooksMinLoraFile_LoadsAndMatchesTheFormula(bool pickle, double alpha)
    {
        manual_seed(21);
        using var model = new ToyNet();
        var a1 = randn(3, 16); var b1 = randn(24, 3);
        var a2 = randn(5, 24); var b2 = randn(8, 5);
        var dict = new Dictionary<string, Tensor>
        {
            ["fc1.parametrizations.weight.0.lora_A"] = a1,
            ["fc1.parametrizations.weight.0.lora_B"] = b1,
            ["fc2.parametrizations.weight.0.lora_A"] = a2,
            ["fc2.parametrizations.weight.0.lora_B"] = b2,
        };
        var path = Path.Combine(_dir, pickle ? "lora.pth" : "lora.safetensors");
        if (pickle) PyTorchPickler.PickleStateDict(path, new System.Collections.Hashtable(dict));
        else Safetensors.SaveStateDict(path, dict);

        var sd = model.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value.detach().to(ScalarType.Float64).clone());
        var adapted = model.LoadMinLoraFile(path, alpha);
        Assert.Equal(new[] { "fc1", "fc2" }, adapted.OrderBy(p => p, StringComparer.Ordinal));
        model.eval();
        using var ids = tensor(new long[] { 1, 7, 3, 9 }, new long[] { 1, 4 });
        using var noGrad = no_grad();
        var got = model.call(ids).to(ScalarType.Float64);

        var x = sd["emb.weight"].index_select(0, ids.reshape(-1)).reshape(1, 4, 16);
        Tensor Layer(Tensor h, string name, Tensor a, Tensor b) =>
            h.matmul(sd[name + ".weight"].t()) + sd[name + ".bias"] + h.matmul(a.to(ScalarType.Float64).t()).matmul(b.to(ScalarType.Float64).t()) * (alpha / a.shape[0]);
        var expected = Layer(Layer(x, "fc1", a1, b1).tanh(), "fc2", a2, b2);
        // float32 forward over 16–24 terms of O(1–10) values: well under 1e-4 relative.
        var err = ((got - expected).abs().max() / expected.abs().max()).item<double>();
        Assert.True(err < 1e-5, $"relative error {err}");
    }

    [Fact]
    public void MinLoraFile_WithForeignKeysOrMismatchedRanks_IsRefusedAndChangesNothing()
    {
        using var model = new ToyNet();
        var path = Path.Combine(_dir, "bad.safetensors");
        Safetensors.SaveStateDict(path, new Dictionary<string, Tensor> { ["fc1.lora_A.weight"] = zeros(2, 16) });
        Assert.Contains("not a minLoRA key", Assert.Throws<InvalidDataException>(() => model.LoadMinLoraFile(path)).Message, StringComparison.Ordinal);
        Safetensors.SaveStateDict(path, new Dictionary<string, Tensor>
        {
            ["fc1.parametrizations.weight.0.lora_A"] = zeros(2, 16),
            ["fc1.parametrizations.weight.0.lora_B"] = zeros(24, 3),
        });
        Assert.Contains("disagree on the rank", Assert.Throws<InvalidDataException>(() => model.LoadMinLoraFile(path)).Message, StringComparison.Ordinal);
        Safetensors.SaveStateDict(path, new Dictionary<string, Tensor>
        {
            ["emb.parametrizations.weight.0.lora_A"] = zeros(2, 50),
            ["emb.parametrizations.weight.0.lora_B"] = zeros(16, 2),
        });
        Assert.Contains("linear layers only", Assert.Throws<InvalidDataException>(() => model.LoadMinLoraFile(path)).Message, StringComparison.Ordinal);
        Safetensors.SaveStateDict(path, new Dictionary<string, Tensor>
        {
            ["fc1.parametrizations.weight.0.lora_A"] = zeros(2, 15),
            ["fc1.parametrizations.weight.0.lora_B"] = zeros(24, 2),
        });
        Assert.Throws<StateDictMismatchException>(() => model.LoadMinLoraFile(path));
        Assert.Empty(model.GetLoraAdapterNames());
    }

    /// <summary>
    /// 1,500 mutated or truncated adapter configs (time-bounded) beside valid weights: loading succeeds or throws a
    /// documented exception, and a failed load leaves the model exactly as it was (no adapter, same parameters).
    /// </summary>
    [Fact]
    public void AdapterConfig_Fuzz_OnlyDocumentedExceptions_AndNoPartialState()
    {
        var dir = WriteAdapter(Path.Combine(_dir, "fuzz"), "{\"peft_type\":\"LORA\",\"r\":4,\"lora_alpha\":8,\"lora_dropout\":0.0,\"target_modules\":[\"fc1\"],\"rank_pattern\":{},\"alpha_pattern\":{},\"bias\":\"none\",\"use_rslora\":false}", ToyAdapterTensors());
        var configPath = Path.Combine(dir, LoraAdapterFiles.ConfigFileName);
        var valid = File.ReadAllBytes(configPath);
        using var model = new ToyNet();
        var before = Snapshot.Clone(model);
        var rng = new Random(5);
        var clock = System.Diagnostics.Stopwatch.StartNew();
        int refused = 0, loaded = 0;
        const string Alphabet = "{}[]\":,.-0123456789eEtrufalsn";
        for (int i = 0; i < 1500 && clock.Elapsed < TimeSpan.FromSeconds(30); i++)
        {
            byte[] bytes = rng.Next(4) == 0 ? valid[..rng.Next(valid.Length)] : (byte[])valid.Clone();
            if (bytes.Length == valid.Length)
                for (int m = rng.Next(1, 4); m > 0; m--) bytes[rng.Next(bytes.Length)] = (byte)Alphabet[rng.Next(Alphabet.Length)];
            File.WriteAllBytes(configPath, bytes);
            try
            {
                model.LoadLoraAdapter(dir);
                loaded++;
                model.RemoveLora();
            }
            catch (Exception ex) when (ex is InvalidDataException or StateDictMismatchException or ArgumentException)
            {
                refused++;
                Assert.Empty(model.GetLoraAdapterNames());
            }
        }
        Snapshot.AssertEqual(before, Snapshot.Clone(model));
        Assert.True(refused > 100 && loaded > 0, $"{refused} refused, {loaded} loaded");
    }
}
