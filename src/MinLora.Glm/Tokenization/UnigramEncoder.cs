using System.Buffers.Binary;

namespace MinLora.Glm.Tokenization;

/// <summary>
/// SentencePiece's normalizer as a <c>.model</c> file configures it: user-defined symbols kept verbatim, the
/// precompiled character map (a Darts double-array trie of replacement rules, e.g. NFKC) applied by longest match,
/// extra whitespace removed, the dummy prefix added and spaces escaped to <c>▁</c>. Works on UTF-8 bytes, as
/// SentencePiece does, so its output is byte-for-byte the text SentencePiece segments.
/// </summary>
internal sealed class SentencePieceNormalizer
{
    private const int MaxRuleMatches = 32;              // SentencePiece considers at most 32 prefix matches
    private static ReadOnlySpan<byte> SpaceSymbol => "\u2581"u8;

    private readonly uint[] _units = Array.Empty<uint>();
    private readonly byte[] _replacements = Array.Empty<byte>();
    private readonly ByteTrie? _userDefined;
    private readonly bool _addDummyPrefix, _removeExtraWhitespaces, _escapeWhitespaces, _suffix;

    public SentencePieceNormalizer(SentencePieceModel model, ByteTrie? userDefinedSymbols)
    {
        _addDummyPrefix = model.AddDummyPrefix;
        _removeExtraWhitespaces = model.RemoveExtraWhitespaces;
        _escapeWhitespaces = model.EscapeWhitespaces;
        _suffix = model.TreatWhitespaceAsSuffix;
        _userDefined = userDefinedSymbols;
        var map = model.PrecompiledCharsMap;
        if (map.Length == 0) return;
        if (map.Length <= 4) throw new InvalidDataException("The SentencePiece model's precompiled character map is broken.");
        uint trieBytes = BinaryPrimitives.ReadUInt32LittleEndian(map);
        if (trieBytes >= map.Length - 4 || trieBytes % 4 != 0) throw new InvalidDataException("The SentencePiece model's character map trie exceeds its blob.");
        _units = new uint[trieBytes / 4];
        for (int i = 0; i < _units.Length; i++) _units[i] = BinaryPrimitives.ReadUInt32LittleEndian(map.AsSpan(4 + 4 * i));
        _replacements = map.AsSpan(4 + (int)trieBytes).ToArray();
    }

    /// <summary>
    /// Normalizes UTF-8 <paramref name="input"/> into <paramref name="output"/> (cleared first). With
    /// <paramref name="map"/>, records for every output byte the input byte offset it came from, plus one final entry
    /// (SentencePiece's norm_to_orig).
    /// </summary>
    [System.Runtime.CompilerServices.MethodImpl(System.Runtime.CompilerServices.MethodImplOptions.AggressiveOptimization)]
    public void Normalize(ReadOnlySpan<byte> input, List<byte> output, List<int>? map = null)
    {
        output.Clear();
        map?.Clear();
        int consumedTotal = 0;
        if (input.IsEmpty)
        {
            map?.Add(0);
            return;
        }
        if (_removeExtraWhitespaces)
        {
            // Leading spaces (after normalization) are dropped.
            while (!input.IsEmpty)
            {
                int consumed = NormalizePrefix(input, out var piece);
                if (!(piece.Length == 1 && piece[0] == (byte)' ')) break;
                input = input[consumed..];
                consumedTotal += consumed;
            }
        }
        if (input.IsEmpty)
        {
            map?.Add(consumedTotal);
            return;
        }
        if (!_suffix && _addDummyPrefix) AddSpace(output, map, consumedTotal);
        bool previousSpace = _removeExtraWhitespaces;
        while (!input.IsEmpty)
        {
            int consumed = NormalizePrefix(input, out var piece);
            if (previousSpace)
            {
                while (!piece.IsEmpty && piece[0] == (byte)' ') piece = piece[1..];
            }
            if (!piece.IsEmpty)
            {
                foreach (var b in piece)
                {
                    if (_escapeWhitespaces && b == (byte)' ') AddSpace(output, map, consumedTotal);
                    else
                    {
                        output.Add(b);
                        map?.Add(consumedTotal);
                    }
                }
                previousSpace = piece[^1] == (byte)' ';
            }
            input = input[consumed..];
            consumedTotal += consumed;
            if (!_removeExtraWhitespaces) previousSpace = false;
        }
        if (_removeExtraWhitespaces)
        {
            var space = _escapeWhitespaces ? SpaceSymbol : " "u8;
            while (output.Count >= space.Length && EndsWith(output, space))
            {
                int length = output.Count - space.Length;
                if (map is not null)
                {
                    consumedTotal = map[length];
                    map.RemoveRange(length, map.Count - length);
                }
                output.RemoveRange(length, space.Length);
            }
        }
        if (_suffix && _addDummyPrefix) AddSpace(output, map, consumedTotal);
        map?.Add(consumedTotal);
    }

    private void AddSpace(List<byte> output, List<int>? map, int consumed)
    {
        if (_escapeWhitespaces)
        {
            output.AddRange(SpaceSymbol);
            if (map is not null) for (int i = 0; i < SpaceSymbol.Length; i++) map.Add(consumed);
        }
        else
        {
            output.Add((byte)' ');
            map?.Add(consumed);
        }
    }

    private static bool EndsWith(List<byte> output, ReadOnlySpan<byte> suffix)
    {
        for (int i = 0; i < suffix.Length; i++)
        {
            if (output[output.Count - suffix.Length + i] != suffix[i]) return false;
        }
        return true;
    }

    /// <summary>The normalized form of the longest rule matching the start of <paramref name="input"/>; returns the bytes it consumes.</summary>
    private int NormalizePrefix(ReadOnlySpan<byte> input, out ReadOnlySpan<byte> piece)
    {
        if (_userDefined is not null)
        {
            int length = _userDefined.LongestPrefix(input, out _);
            if (length > 0)
            {
                piece = input[..length];
                return length;
            }
        }
        int longest = 0, value = 0;
        if (_units.Length > 0) (longest, value) = LongestRule(input);
        if (longest == 0)
        {
            int n = Utf8.CharLength(input);
            if (n <= 0)
            {
                piece = "\uFFFD"u8;                 // malformed UTF-8: one byte becomes U+FFFD
                return 1;
            }
            piece = input[..n];
            return n;
        }
        int end = value;
        while (end < _replacements.Length && _replacements[end] != 0) end++;
        piece = _replacements.AsSpan(value, end - value);
        return longest;
    }

    /// <summary>Darts-clone common-prefix search over the character map's double array, keeping the longest of the first 32 matches.</summary>
    private (int Length, int Value) LongestRule(ReadOnlySpan<byte> key)
    {
        uint id = Offset(_units[0]);
        int longest = 0, value = 0, matches = 0;
        for (int i = 0; i < key.Length; i++)
        {
            id ^= key[i];
            if (id >= (uint)_units.Length) break;
            uint unit = _units[id];
            if ((unit & ((1u << 31) | 0xFF)) != key[i]) break;
            id ^= Offset(unit);
            if (((unit >> 8) & 1) != 0)
            {
                if (id >= (uint)_units.Length) break;
                if (matches++ < MaxRuleMatches && i + 1 > longest)
                {
                    longest = i + 1;
                    value = (int)(_units[id] & ((1u << 31) - 1));
                }
            }
        }
        if (value >= _replacements.Length) return (0, 0);
        return (longest, value);
    }

    private static uint Offset(uint unit) => (unit >> 10) << (int)((unit & (1u << 9)) >> 6);
}

/// <summary>UTF-8 helpers with SentencePiece's rules, shared by the GLM tokenizers.</summary>
internal static class Utf8
{
    /// <summary>
    /// UTF-8 of <paramref name="text"/>, each invalid UTF-16 code unit (a lone or reversed surrogate) written as the
    /// byte 0xFF, which SentencePiece's normalizer turns into one U+FFFD that no normalization rule touches (a literal
    /// U+FFFD becomes a space under NFKC): bad text is never dropped silently. With <paramref name="charOfByte"/>, the
    /// index of the character each byte came from, plus a final entry.
    /// </summary>
    public static byte[] Encode(string text, List<int>? charOfByte = null)
    {
        var output = new List<byte>(text.Length * 3);
        Span<byte> buffer = stackalloc byte[4];
        for (int i = 0; i < text.Length;)
        {
            if (System.Text.Rune.TryGetRuneAt(text, i, out var rune))
            {
                int n = rune.EncodeToUtf8(buffer);
                for (int k = 0; k < n; k++)
                {
                    output.Add(buffer[k]);
                    charOfByte?.Add(i);
                }
                i += rune.Utf16SequenceLength;
            }
            else
            {
                output.Add(0xFF);
                charOfByte?.Add(i);
                i++;
            }
        }
        charOfByte?.Add(text.Length);
        return output.ToArray();
    }

    /// <summary>
    /// Span decoding for the Microsoft.ML.Tokenizers API: the text of the longest prefix of <paramref name="ids"/> that
    /// fits (decoding is not prefix-additive: byte pieces join, the dummy-prefix space is trimmed).
    /// </summary>
    public static System.Buffers.OperationStatus DecodeInto(Func<IEnumerable<int>, string> decode, IEnumerable<int> ids, Span<char> destination, out int idsConsumed, out int charsWritten)
    {
        ArgumentNullException.ThrowIfNull(ids);
        var list = ids as IReadOnlyList<int> ?? ids.ToList();
        for (int count = list.Count; count >= 0; count--)
        {
            var text = decode(list.Take(count));
            if (text.Length <= destination.Length)
            {
                text.AsSpan().CopyTo(destination);
                idsConsumed = count;
                charsWritten = text.Length;
                return count == list.Count ? System.Buffers.OperationStatus.Done : System.Buffers.OperationStatus.DestinationTooSmall;
            }
        }
        idsConsumed = 0;
        charsWritten = 0;
        return System.Buffers.OperationStatus.DestinationTooSmall;
    }

    /// <summary>SentencePiece's OneCharLen: the length a lead byte announces (1 for continuation bytes).</summary>
    public static int LeadLength(byte b) => (b >> 4) switch { < 0xC => 1, 0xC or 0xD => 2, 0xE => 3, _ => 4 };

    /// <summary>The length of the valid UTF-8 character at the start, or 0 when it is malformed (SentencePiece's IsValidDecodeUTF8).</summary>
    public static int CharLength(ReadOnlySpan<byte> s)
    {
        if (s.IsEmpty) return 0;
        var status = System.Text.Rune.DecodeFromUtf8(s, out _, out int consumed);
        return status == System.Buffers.OperationStatus.Done ? consumed : 0;
    }
}

/// <summary>
/// A byte trie from piece bytes to ids: built with a hash table of transitions, then frozen into sorted child arrays
/// (a 256-entry table for the root, a short linear or binary search below it) for lookups.
/// </summary>
internal sealed class ByteTrie
{
    private Dictionary<long, int>? _building = new();
    private readonly List<int> _values = new() { -1 };
    private int[] _root = Array.Empty<int>();
    private int[] _childStart = Array.Empty<int>();
    private byte[] _labels = Array.Empty<byte>();
    private int[] _targets = Array.Empty<int>();
    private int[] _valueArray = Array.Empty<int>();

    public void Add(ReadOnlySpan<byte> key, int value)
    {
        var next = _building ?? throw new InvalidOperationException("The trie is frozen.");
        if (key.IsEmpty) return;
        int node = 0;
        foreach (var b in key)
        {
            long edge = ((long)node << 8) | b;
            if (!next.TryGetValue(edge, out int child))
            {
                child = _values.Count;
                _values.Add(-1);
                next[edge] = child;
            }
            node = child;
        }
        _values[node] = value;
    }

    /// <summary>Turns the transitions into sorted arrays; no more keys can be added.</summary>
    public ByteTrie Freeze()
    {
        var next = _building ?? throw new InvalidOperationException("The trie is frozen.");
        int nodes = _values.Count;
        var counts = new int[nodes + 1];
        foreach (var edge in next.Keys) counts[(int)(edge >> 8)]++;
        _childStart = new int[nodes + 1];
        for (int i = 0; i < nodes; i++) _childStart[i + 1] = _childStart[i] + counts[i];
        var fill = (int[])_childStart.Clone();
        var edges = next.OrderBy(e => e.Key).ToList();                   // by node, then label
        _labels = new byte[edges.Count];
        _targets = new int[edges.Count];
        foreach (var (edge, child) in edges)
        {
            int node = (int)(edge >> 8), at = fill[node]++;
            _labels[at] = (byte)edge;
            _targets[at] = child;
        }
        _root = new int[256];
        Array.Fill(_root, -1);
        for (int i = _childStart[0]; i < _childStart[1]; i++) _root[_labels[i]] = _targets[i];
        _valueArray = _values.ToArray();
        _building = null;
        return this;
    }

    /// <summary>Follows one byte from <paramref name="node"/>; −1 when there is no such edge.</summary>
    [System.Runtime.CompilerServices.MethodImpl(System.Runtime.CompilerServices.MethodImplOptions.AggressiveInlining)]
    public int Step(int node, byte b)
    {
        if (node == 0) return _root[b];
        int lo = _childStart[node], hi = _childStart[node + 1] - 1;
        while (hi - lo > 6)
        {
            int mid = (lo + hi) >> 1;
            if (_labels[mid] < b) lo = mid + 1;
            else hi = mid;
        }
        for (int i = lo; i <= hi; i++)
        {
            if (_labels[i] == b) return _targets[i];
        }
        return -1;
    }

    /// <summary>The value stored at <paramref name="node"/> (−1: none).</summary>
    public int ValueAt(int node) => _valueArray[node];

    /// <summary>The length of the longest key that starts <paramref name="text"/> (0: none), and its value.</summary>
    public int LongestPrefix(ReadOnlySpan<byte> text, out int value)
    {
        int node = 0, longest = 0;
        value = -1;
        for (int i = 0; i < text.Length; i++)
        {
            node = Step(node, text[i]);
            if (node < 0) break;
            if (_valueArray[node] >= 0)
            {
                longest = i + 1;
                value = _valueArray[node];
            }
        }
        return longest;
    }
}

/// <summary>
/// What SentencePiece's Unigram and BPE encoders share: the piece table (normal, user-defined and unused pieces in a
/// trie, scores, types, the unknown and byte pieces), the model's normalizer, and the processor's output step (an
/// unknown piece becomes its UTF-8 byte pieces with byte fallback; without it a run of unknowns is one <c>&lt;unk&gt;</c>).
/// </summary>
internal abstract class PieceEncoderBase : IPieceEncoder
{
    protected PieceEncoderBase(SentencePieceModel model)
    {
        Model = model;
        int n = model.Pieces.Count;
        Scores = new float[n];
        Types = new PieceType[n];
        Array.Fill(ByteIds, -1);
        ByteTrie? userDefined = null;
        for (int i = 0; i < n; i++)
        {
            var p = model.Pieces[i];
            Scores[i] = p.Score;
            Types[i] = p.Type;
            switch (p.Type)
            {
                case PieceType.Normal:
                    // As SentencePiece: min/max over normal pieces only, from FLT_MAX and FLT_MIN (the smallest normal float).
                    MinScore = Math.Min(MinScore, p.Score);
                    MaxScore = Math.Max(MaxScore, p.Score);
                    Pieces.Add(model.PieceBytes[i], i);
                    break;
                case PieceType.UserDefined:
                    Pieces.Add(model.PieceBytes[i], i);
                    (userDefined ??= new ByteTrie()).Add(model.PieceBytes[i], i);
                    break;
                case PieceType.Unused:
                    Pieces.Add(model.PieceBytes[i], i);
                    break;
                case PieceType.Unknown:
                    if (UnkId < 0) UnkId = i;
                    break;
                case PieceType.Byte:
                    if (p.Piece.Length == 6 && p.Piece.StartsWith("<0x", StringComparison.Ordinal) && p.Piece.EndsWith('>') &&
                        byte.TryParse(p.Piece.AsSpan(3, 2), System.Globalization.NumberStyles.HexNumber, null, out byte b))
                        ByteIds[b] = i;
                    break;
            }
        }
        if (UnkId < 0) throw new InvalidDataException("The SentencePiece model has no <unk> piece.");
        Pieces.Freeze();
        UserDefined = userDefined?.Freeze();
        Normalizer = new SentencePieceNormalizer(model, UserDefined);
    }

    protected SentencePieceModel Model { get; }

    protected ByteTrie Pieces { get; } = new();

    protected ByteTrie? UserDefined { get; }

    protected SentencePieceNormalizer Normalizer { get; }

    protected float[] Scores { get; }

    protected PieceType[] Types { get; }

    protected float MinScore { get; } = float.MaxValue;

    protected float MaxScore { get; } = 1.17549435E-38f;

    protected int UnkId { get; } = -1;

    protected int[] ByteIds { get; } = new int[256];

    public abstract void Encode(ReadOnlySpan<byte> utf8, List<int> ids, List<(int Start, int End)>? spans);

    /// <summary>Normalizes <paramref name="utf8"/>; with spans wanted, also the source byte of each normalized byte.</summary>
    protected byte[] Normalize(ReadOnlySpan<byte> utf8, bool wantMap, out List<int>? map)
    {
        var normalized = new List<byte>(utf8.Length + 8);
        map = wantMap ? new List<int>(utf8.Length + 8) : null;
        Normalizer.Normalize(utf8, normalized, map);
        return normalized.ToArray();
    }

    /// <summary>
    /// Appends the piece <paramref name="id"/> (−1 or the unknown id: unknown) covering normalized bytes [start, end) as
    /// the processor does: byte fallback or unknown merging; spans map back through <paramref name="map"/>.
    /// </summary>
    protected void Append(int id, int start, int end, byte[] text, List<int>? map, List<int> ids, List<(int Start, int End)>? spans, ref bool previousUnknown)
    {
        bool unknown = id < 0 || id == UnkId;
        int from = map?[start] ?? 0, to = map?[end] ?? 0;
        if (unknown && Model.ByteFallback)
        {
            for (int i = start; i < end; i++)
            {
                ids.Add(ByteIds[text[i]] >= 0 ? ByteIds[text[i]] : UnkId);
                spans?.Add(i == start ? (from, to) : (to, to));
            }
        }
        else if (unknown && previousUnknown)
        {
            if (spans is not null) spans[^1] = (spans[^1].Start, to);      // the merged <unk> covers the run
        }
        else
        {
            ids.Add(unknown ? UnkId : id);
            spans?.Add((from, to));
        }
        previousUnknown = unknown;
    }
}

/// <summary>
/// SentencePiece's Unigram segmentation, computed exactly as its optimized encoder (unigram_model.cc,
/// <c>EncodeOptimized</c>, the default since 0.1.96) computes it: one pass over UTF-8 positions keeping the best path
/// that ends at each position, candidate scores in double compared against the stored float, the first of equal
/// scores kept, user-defined symbols scored <c>bytes·max_score − 0.1</c>, an unknown character scored
/// <c>min_score − 10</c> in float; then byte fallback (or runs of unknowns merged into one <c>&lt;unk&gt;</c>) as its
/// processor does. Linear in the input length.
/// </summary>
internal sealed class UnigramEncoder : PieceEncoderBase
{
    public UnigramEncoder(SentencePieceModel model) : base(model)
    {
    }

    private struct Best
    {
        public int Id;
        public float Score;
        public int StartsAt;
    }

    /// <summary>Appends the ids of <paramref name="utf8"/> (raw UTF-8 text: normalized here) to <paramref name="ids"/>.</summary>
    public void Encode(ReadOnlySpan<byte> utf8, List<int> ids) => Encode(utf8, ids, null);

    /// <summary>
    /// As <see cref="Encode(ReadOnlySpan{byte}, List{int})"/>; with <paramref name="spans"/>, also each id's source
    /// range in <paramref name="utf8"/> (bytes [start, end); the second and later bytes of a byte-fallback character get
    /// an empty range at its end).
    /// </summary>
    [System.Runtime.CompilerServices.MethodImpl(System.Runtime.CompilerServices.MethodImplOptions.AggressiveOptimization)]
    public override void Encode(ReadOnlySpan<byte> utf8, List<int> ids, List<(int Start, int End)>? spans)
    {
        var text = Normalize(utf8, spans is not null, out var map);
        if (text.Length == 0) return;
        int size = text.Length;
        var best = new Best[size + 1];
        for (int i = 1; i <= size; i++) best[i].StartsAt = -1;
        float unkScore = MinScore - 10.0f;
        int start = 0;
        while (start < size)
        {
            float tillHere = best[start].Score;
            bool hasSingle = false;
            int charLength = Math.Min(Utf8.LeadLength(text[start]), size - start);
            int node = 0;
            for (int pos = start; pos < size;)
            {
                node = Pieces.Step(node, text[pos]);
                pos++;
                if (node < 0) break;
                int id = Pieces.ValueAt(node);
                if (id < 0 || Types[id] == PieceType.Unused) continue;
                int length = pos - start;
                // As SentencePiece: the user-defined bonus in double ((float)bytes·max − 0.1), the sum in double,
                // compared with the stored float, stored as float; the first of equal scores stays.
                double score = Types[id] == PieceType.UserDefined ? (double)((float)length * MaxScore) - 0.1 : Scores[id];
                double candidate = score + tillHere;
                ref var target = ref best[pos];
                if (target.StartsAt == -1 || candidate > target.Score)
                {
                    target.Score = (float)candidate;
                    target.StartsAt = start;
                    target.Id = id;
                }
                if (!hasSingle && length == charLength) hasSingle = true;
            }
            if (!hasSingle)
            {
                ref var target = ref best[start + charLength];
                float candidate = unkScore + tillHere;
                if (target.StartsAt == -1 || candidate > target.Score)
                {
                    target.Score = candidate;
                    target.StartsAt = start;
                    target.Id = UnkId;
                }
            }
            start += charLength;
        }

        // Backtrack, then byte fallback or unknown merging.
        var path = new List<(int Start, int End, int Id)>();
        for (int end = size; end > 0;)
        {
            var b = best[end];
            path.Add((b.StartsAt, end, b.Id));
            end = b.StartsAt;
        }
        bool previousUnknown = false;
        for (int k = path.Count - 1; k >= 0; k--) Append(path[k].Id, path[k].Start, path[k].End, text, map, ids, spans, ref previousUnknown);
    }
}

/// <summary>A SentencePiece segmentation algorithm over a model file's pieces (Unigram or BPE).</summary>
internal interface IPieceEncoder
{
    /// <summary>Appends the ids of UTF-8 <paramref name="utf8"/> (normalized here); with <paramref name="spans"/>, each id's source byte range.</summary>
    void Encode(ReadOnlySpan<byte> utf8, List<int> ids, List<(int Start, int End)>? spans);
}

/// <summary>
/// SentencePiece's BPE segmentation (bpe_model.cc) exactly: characters (user-defined symbols whole and frozen), then
/// repeatedly the adjacent pair whose concatenation is a piece with the highest score — ties to the leftmost — is
/// merged (pairs made stale by an earlier merge are skipped), unused pieces resegmented into their halves; then byte
/// fallback or unknown merging as for Unigram.
/// </summary>
internal sealed class BpeEncoder : PieceEncoderBase
{
    public BpeEncoder(SentencePieceModel model) : base(model)
    {
    }

    private struct Symbol
    {
        public int Prev, Next, Start, Length;
        public bool Freeze;
    }

    /// <summary>The id of exactly these bytes among normal, user-defined and unused pieces, or −1.</summary>
    private int Lookup(ReadOnlySpan<byte> piece)
    {
        int node = 0;
        foreach (var b in piece)
        {
            node = Pieces.Step(node, b);
            if (node < 0) return -1;
        }
        return Pieces.ValueAt(node);
    }

    [System.Runtime.CompilerServices.MethodImpl(System.Runtime.CompilerServices.MethodImplOptions.AggressiveOptimization)]
    public override void Encode(ReadOnlySpan<byte> utf8, List<int> ids, List<(int Start, int End)>? spans)
    {
        var text = Normalize(utf8, spans is not null, out var map);
        if (text.Length == 0) return;

        // Characters (a user-defined symbol is one frozen symbol).
        var symbols = new List<Symbol>(text.Length);
        for (int pos = 0; pos < text.Length;)
        {
            int length = UserDefined?.LongestPrefix(text.AsSpan(pos), out _) ?? 0;
            bool freeze = length > 0;
            if (!freeze) length = Math.Min(Utf8.LeadLength(text[pos]), text.Length - pos);
            int index = symbols.Count;
            symbols.Add(new Symbol { Prev = index - 1, Next = pos + length < text.Length ? index + 1 : -1, Start = pos, Length = length, Freeze = freeze });
            pos += length;
        }

        // Highest score first; equal scores: the leftmost pair.
        var agenda = new PriorityQueue<(int Left, int Right, int Size), (float Score, int Left)>(Comparer<(float Score, int Left)>.Create(
            (a, b) => a.Score != b.Score ? b.Score.CompareTo(a.Score) : a.Left.CompareTo(b.Left)));
        // As the reference's rev_merge: keyed by the merged text (the last split recorded for a text wins), the left half's length.
        var unusedHalves = new Dictionary<string, int>(StringComparer.Ordinal);
        void MaybeAdd(int left, int right)
        {
            if (left < 0 || right < 0) return;
            var l = symbols[left];
            var r = symbols[right];
            if (l.Freeze || r.Freeze) return;
            int id = Lookup(text.AsSpan(l.Start, l.Length + r.Length));
            if (id < 0) return;
            agenda.Enqueue((left, right, l.Length + r.Length), (Scores[id], left));
            if (Types[id] == PieceType.Unused) unusedHalves[System.Text.Encoding.Latin1.GetString(text, l.Start, l.Length + r.Length)] = l.Length;
        }
        for (int i = 1; i < symbols.Count; i++) MaybeAdd(i - 1, i);
        while (agenda.TryDequeue(out var top, out _))
        {
            var l = symbols[top.Left];
            var r = symbols[top.Right];
            if (l.Length == 0 || r.Length == 0 || l.Length + r.Length != top.Size) continue;   // stale
            l.Length += r.Length;
            l.Next = r.Next;
            if (r.Next >= 0)
            {
                var after = symbols[r.Next];
                after.Prev = top.Left;
                symbols[r.Next] = after;
            }
            r.Length = 0;
            symbols[top.Left] = l;
            symbols[top.Right] = r;
            MaybeAdd(l.Prev, top.Left);
            MaybeAdd(top.Left, l.Next);
        }

        bool previousUnknown = false;
        void Emit(int start, int length)
        {
            int id = Lookup(text.AsSpan(start, length));
            if (id >= 0 && Types[id] == PieceType.Unused && unusedHalves.TryGetValue(System.Text.Encoding.Latin1.GetString(text, start, length), out int left))
            {
                Emit(start, left);
                Emit(start + left, length - left);
                return;
            }
            Append(id, start, start + length, text, map, ids, spans, ref previousUnknown);
        }
        for (int index = 0; index != -1; index = symbols[index].Next) Emit(symbols[index].Start, symbols[index].Length);
    }
}
