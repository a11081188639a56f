using System.Diagnostics;

namespace MinLora.Samples;

/// <summary>A one-line progress bar on a console, or a line every 10 % when output is redirected.</summary>
internal sealed class ProgressBar(TextWriter writer, int total) : IDisposable
{
    private readonly Stopwatch _clock = Stopwatch.StartNew();
    private readonly bool _interactive = ReferenceEquals(writer, Console.Out) && !Console.IsOutputRedirected;
    private int _lastDecile = -1;

    /// <summary>Shows progress.</summary>
    public void Report(int done, string status)
    {
        double fraction = (double)done / total;
        string bar = new string('#', (int)(fraction * 30)).PadRight(30, '-');
        string line = $"   [{bar}] {done,5}/{total} {status} {_clock.Elapsed.TotalSeconds,6:F1}s";
        if (_interactive)
        {
            writer.Write("\r" + line);
        }
        else if ((int)(fraction * 10) is var decile && decile != _lastDecile)
        {
            _lastDecile = decile;
            writer.WriteLine(line);
        }
    }

    /// <summary>Ends the line.</summary>
    public void Dispose()
    {
        if (_interactive) writer.WriteLine();
    }
}
