using System.CommandLine;
using System.CommandLine.Parsing;
using System.Globalization;

namespace MinLora.Samples;

/// <summary>
/// The samples' command-line conventions on System.CommandLine: options with descriptions and defaults (shown by
/// <c>--help</c>), numbers in the invariant culture only ("1,5" is not 15, "1e3" is not an integer, NaN and ∞ are
/// refused), ranges checked while parsing, and the first problem reported as one line.
/// </summary>
internal static class SampleCommandLine
{
    /// <summary>
    /// Parses <paramref name="args"/> as the samples do: no <c>--version</c> (the samples have none to report, and an
    /// unhandled version action would start the job) and no <c>@file</c> response files (an argument starting with
    /// '@' is a value like any other).
    /// </summary>
    public static ParseResult Parse(RootCommand root, IReadOnlyList<string> args)
    {
        foreach (var version in root.Options.OfType<VersionOption>().ToList()) root.Options.Remove(version);
        return root.Parse(args, new ParserConfiguration { ResponseFileTokenReplacer = null });
    }

    /// <summary>A text option with a default.</summary>
    public static Option<string> Text(string name, string description, string fallback) =>
        new(name) { Description = description, DefaultValueFactory = _ => fallback };

    /// <summary>A switch (false when absent; present alone or as <c>--name true|false</c>).</summary>
    public static Option<bool> Flag(string name, string description) => new(name) { Description = description };

    /// <summary>An integer option with a default and a lower bound.</summary>
    public static Option<int> Integer(string name, string description, int fallback, int min = int.MinValue) => new(name)
    {
        Description = description,
        DefaultValueFactory = _ => fallback,
        CustomParser = r => ParseInteger(r, name, min) ?? 0,
    };

    /// <summary>An integer option without a default (null when absent), at least <paramref name="min"/>.</summary>
    public static Option<int?> OptionalInteger(string name, string description, int min = int.MinValue) => new(name)
    {
        Description = description,
        CustomParser = r => ParseInteger(r, name, min),
    };

    /// <summary>A finite real option with a default; <paramref name="positive"/> refuses zero and negatives.</summary>
    public static Option<double> Real(string name, string description, double fallback, bool positive = false) => new(name)
    {
        Description = description,
        DefaultValueFactory = _ => fallback,
        CustomParser = r =>
        {
            var text = r.Tokens.Count > 0 ? r.Tokens[0].Value : "";
            if (!double.TryParse(text, NumberStyles.Float, CultureInfo.InvariantCulture, out var v) || !double.IsFinite(v))
            {
                r.AddError($"{name} needs a finite number, got '{text}'");
                return 0;
            }
            if (positive && !(v > 0)) r.AddError($"{name} must be a positive number, got {v.ToString(CultureInfo.InvariantCulture)}");
            return v;
        },
    };

    /// <summary>The first problem of a parse as one line, or null: a missing value, an option's own error, an unknown option.</summary>
    public static string? FirstError(Command command, ParseResult parsed)
    {
        foreach (var option in command.Options)
        {
            if (parsed.GetResult(option) is { Implicit: false } result && result.Tokens.Count == 0 && result.IdentifierTokenCount > 0
                && option.Arity.MinimumNumberOfValues > 0)
                return $"{option.Name} needs a value";
        }
        // An option's own complaint first ("--rank --out x": --rank got "--out"), then what matched nothing.
        if (parsed.Errors.FirstOrDefault(e => e.SymbolResult is OptionResult or ArgumentResult) is { } optionError) return optionError.Message;
        if (parsed.UnmatchedTokens.Count > 0) return $"unknown option {parsed.UnmatchedTokens[0]}";
        return parsed.Errors.Count > 0 ? parsed.Errors[0].Message : null;
    }

    private static int? ParseInteger(ArgumentResult r, string name, int min)
    {
        var text = r.Tokens.Count > 0 ? r.Tokens[0].Value : "";
        if (!int.TryParse(text, NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out var v))
        {
            r.AddError($"{name} needs an integer, got '{text}'");
            return null;
        }
        if (v < min) r.AddError($"{name} must be at least {min}, got {v}");
        return v;
    }
}
