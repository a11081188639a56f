using System.Globalization;
using MinLora;
using MinLora.Glm;
using MinLora.Glm.Generation;
using MinLora.Glm.Tokenization;
using MinLora.Quantization;

// Interactive streaming chat with a GLM checkpoint directory (default: the SPO sample's small built-in model).
//   dotnet run --project samples/MinLora.Samples.Chat -- [--model DIR] [--top-p P] [--temperature T] [--max-new-tokens N] [--bits 0|4|8] [--greedy]
// Type a message and press Enter; "/clear" forgets the history; "/exit" or end of input quits.
CpuThreads.LimitOpenMpSpinning(); // before libtorch loads (see CpuThreads)
NativeAllocator.RetainFreedMemory();
string modelDir = Path.Combine(AppContext.BaseDirectory, "assets", "base");
var options = new GenerationOptions { MaxNewTokens = 128 };
int bits = 0;
try
{
    for (int i = 0; i < args.Length; i++)
    {
        string Value() => i + 1 < args.Length ? args[++i] : throw new ArgumentException($"{args[i]} needs a value");
        switch (args[i])
        {
            case "--model": modelDir = Value(); break;
            case "--top-p": options = options with { TopP = double.Parse(Value(), CultureInfo.InvariantCulture) }; break;
            case "--temperature": options = options with { Temperature = double.Parse(Value(), CultureInfo.InvariantCulture) }; break;
            case "--max-new-tokens": options = options with { MaxNewTokens = int.Parse(Value(), CultureInfo.InvariantCulture) }; break;
            case "--bits": bits = int.Parse(Value(), CultureInfo.InvariantCulture); break;
            case "--greedy": options = options with { DoSample = false }; break;
            default: throw new ArgumentException($"unknown option {args[i]}");
        }
    }
    options.Validate();
}
catch (Exception ex) when (ex is ArgumentException or FormatException or OverflowException)
{
    Console.Error.WriteLine($"error: {ex.Message}");
    return 2;
}

try
{
    var (model, _) = GlmCheckpoint.FromPretrained(modelDir, new GlmLoadOptions { QuantizationBit = bits == 0 ? null : bits });
    using (model)
    {
        var tokenizer = GlmTokenizer.FromPretrained(modelDir);
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
catch (Exception ex) when (ex is IOException or InvalidDataException or UnauthorizedAccessException or NotSupportedException)
{
    Console.Error.WriteLine($"error: {ex.Message}");
    return 1;
}
