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
        // Plain numbers only: no thousands separators, finite values.
        int Int()
        {
            var name = args[i];
            var v = Value();
            return int.TryParse(v, NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out var r) ? r : throw new ArgumentException($"{name} needs an integer, got '{v}'");
        }
        double Real()
        {
            var name = args[i];
            var v = Value();
            return double.TryParse(v, NumberStyles.Float, CultureInfo.InvariantCulture, out var r) && double.IsFinite(r) ? r : throw new ArgumentException($"{name} needs a finite number, got '{v}'");
        }
        switch (args[i])
        {
            case "--model": modelDir = Value(); break;
            case "--top-p": options = options with { TopP = Real() }; break;
            case "--temperature": options = options with { Temperature = Real() }; break;
            case "--max-new-tokens": options = options with { MaxNewTokens = Int() }; break;
            case "--bits": bits = Int(); break;
            case "--greedy": options = options with { DoSample = false }; break;
            default: throw new ArgumentException($"unknown option {args[i]}");
        }
    }
    options.Validate();
    if (bits is not (0 or 4 or 8)) throw new ArgumentException($"--bits must be 0, 4 or 8, got {bits}");
    if (!Directory.Exists(modelDir)) throw new ArgumentException($"--model: no directory '{modelDir}'");
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
catch (Exception ex) when (ex is IOException or InvalidDataException or StateDictMismatchException or UnauthorizedAccessException or NotSupportedException)
{
    Console.Error.WriteLine($"error: {ex.Message}");
    return 1;
}
