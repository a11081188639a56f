using System.Collections;
using TorchSharp;
using TorchSharp.PyBridge;
using static TorchSharp.torch;

namespace MinLora;

/// <summary>
/// Reads a flat name → tensor state dict from a file: safetensors (its header checked by
/// <see cref="SafetensorsHeader"/> before any data is read) or a PyTorch pickle (<c>torch.save</c>: <c>.bin</c>,
/// <c>.pth</c>). The one reader behind adapter, minLoRA and checkpoint loading.
/// </summary>
public static class StateDictFile
{
    /// <summary>Reads <paramref name="path"/>; entries that are not name → tensor pairs are skipped.</summary>
    /// <param name="path">A <c>.safetensors</c> file, or any other name for a pickle.</param>
    /// <returns>The tensors by key (the caller owns them).</returns>
    /// <exception cref="FileNotFoundException">No such file.</exception>
    /// <exception cref="InvalidDataException">The file is corrupt or holds no tensors (the message names the file).</exception>
    public static Dictionary<string, Tensor> Read(string path)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(path);
        if (!File.Exists(path)) throw new FileNotFoundException($"'{path}' does not exist.", path);
        try
        {
            if (path.EndsWith(".safetensors", StringComparison.OrdinalIgnoreCase))
            {
                SafetensorsHeader.Read(path);
                return Safetensors.LoadStateDict(path);
            }
            var dict = new Dictionary<string, Tensor>(StringComparer.Ordinal);
            foreach (DictionaryEntry e in PyTorchUnpickler.UnpickleStateDict(path))
            {
                if (e.Key is string k && e.Value is Tensor t) dict[k] = t;
            }
            if (dict.Count == 0) throw new InvalidDataException("it holds no tensors");
            return dict;
        }
        catch (Exception ex) when (ex is not FileNotFoundException and not OutOfMemoryException)
        {
            throw new InvalidDataException($"Cannot read the state dict file '{path}': {ex.Message}", ex);
        }
    }
}
