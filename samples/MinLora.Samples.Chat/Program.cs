using System.CommandLine;
using MinLora;
using MinLora.Glm;
using MinLora.Glm.Generation;
using MinLora.Glm.Tokenization;
using MinLora.Quantization;
using MinLora.Samples;

// Interactive streaming chat with a GLM checkpoint directory (default: the SPO sample's small built-in model).
//   dotnet run --project samples/MinLora.Samples.Chat -- [--model DIR] [--top-p P] [--temperature T] [--max-new-tokens N] [--bits 0|4|8] [--greedy]
// Type a message and press Enter; "/clear" forgets the history; "/exit" or end of input quits.
CpuThreads.LimitOpenMpSpinning(); // before libtorch loads (see CpuThreads)
NativeAllocator.RetainFreedMemory();
var modelOption = SampleCommandLine.Text("--model", "A GLM checkpoint directory (ChatGLM-6B, ChatGLM2/3 or GLM-4)", Path.Combine(AppContext.BaseDirectory, "assets", "base"));
var topP = SampleCommandLine.Real("--top-p", "Nucleus sampling: keep the most likely tokens up to this probability mass", new GenerationOptions().TopP, positive: true);
var temperature = SampleCommandLine.Real("--temperature", "Sampling temperature (0: greedy)", new GenerationOptions().Temperature);
var maxNewTokens = SampleCommandLine.Integer("--max-new-tokens", "Most tokens per answer", 128, min: 1);
var bitsOption = SampleCommandLine.Integer("--bits", "Quantize the projections on load: 8, 4, or 0 to keep the checkpoint's weights", 0, min: 0);
var greedy = new Option<bool>("--greedy") { Description = "Greedy decoding instead of sampling" };
var root = new RootCommand("MinLora chat: interactive streaming chat with a GLM checkpoint.") { modelOption, topP, temperature, maxNewTokens, bitsOption, greedy };
var parsed = SampleCommandLine.Parse(root, args);
if (parsed.Action is System.CommandLine.Help.HelpAction) return parsed.Invoke();
string modelDir;
GenerationOptions options;
int bits;
try
{
    if (SampleCommandLine.FirstError(root, parsed) is { } error) throw new ArgumentException(error);
    modelDir = parsed.GetValue(modelOption)!;
    options = new GenerationOptions
    {
        MaxNewTokens = parsed.GetValue(maxNewTokens),
        TopP = parsed.GetValue(topP),
        Temperature = parsed.GetValue(temperature),
        DoSample = !parsed.GetValue(greedy),
    };
    bits = parsed.GetValue(bitsOption);
    options.Validate();
    if (bits is not (0 or 4 or 8)) throw new ArgumentException($"--bits must be 0, 4 or 8, got {bits}");
    if (!Directory.Exists(modelDir)) throw new ArgumentException($"--model: no directory '{modelDir}'");
}
catch (ArgumentException ex)
{
    Console.Error.WriteLine($"error: {ex.Message} (try --help)");
    return 2;
}

try
{
    using var model = GlmForCausalLM.FromPretrained(modelDir, new GlmLoadOptions { QuantizationBit = bits == 0 ? null : bits });
    {
        // The directory decides the tokenizer (ChatGLM-6B's ice_text.model, ChatGLM2/3's or GLM-4's tokenizer.model).
        var tokenizer = GlmTokenizers.FromPretrained(modelDir);
        Console.WriteLine($"MinLora chat — {modelDir} ({model.GetSizeInBytes() / 1e6:F1} MB). /clear resets the history, /exit quits.");
        var history = new List<ChatTurn>();
        while (true)
        {
            Console.Write("\n用户: ");
            var query = Console.ReadLine();
            if (query is null || query.Trim() == "/exit") break;
            if (query.Trim() == "/clear") { history.Clear(); Console.WriteLine("(history cleared)"); continue; }
            if (query.Length == 0) continue;
            Console.Write("ChatGLM: ");
            var raw = new System.Text.StringBuilder();
            await foreach (var piece in model.ChatStreamAsync(tokenizer, query, history, options))
            {
                Console.Write(piece);
                raw.Append(piece);
            }
            Console.WriteLine();
            history.Add(new ChatTurn(query, GlmGeneration.ProcessResponse(raw.ToString())));
        }
    }
    return 0;
}
catch (Exception ex) when (ex is IOException or InvalidDataException or StateDictMismatchException or UnauthorizedAccessException or NotSupportedException)
{
    Console.Error.WriteLine($"error: {ex.Message}");
    return 1;
}
