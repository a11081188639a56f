using System.Text;

namespace MinLora.Glm.Tokenization;

/// <summary>The kind of a SentencePiece vocabulary entry (sentencepiece_model.proto, SentencePiece.Type).</summary>
public enum PieceType
{
    /// <summary>An ordinary piece.</summary>
    Normal = 1,
    /// <summary>The unknown piece.</summary>
    Unknown = 2,
    /// <summary>A control symbol (never produced from text; decodes to nothing).</summary>
    Control = 3,
    /// <summary>A user-defined symbol (matched verbatim in the text).</summary>
    UserDefined = 4,
    /// <summary>Unused.</summary>
    Unused = 5,
    /// <summary>A byte-fallback piece <c>&lt;0xXX&gt;</c>.</summary>
    Byte = 6,
}

/// <summary>One vocabulary entry.</summary>
/// <param name="Piece">The piece text.</param>
/// <param name="Score">Its log-probability (Unigram) or rank score.</param>
/// <param name="Type">Its kind.</param>
public readonly record struct SentencePiece(string Piece, float Score, PieceType Type);

/// <summary>
/// The parts of a SentencePiece <c>.model</c> file (a ModelProto protobuf) that decoding and special-token lookup
/// need: every piece with its type, and the normalizer flags. Read directly because Microsoft.ML.Tokenizers does not
/// expose byte and control pieces (its Vocabulary lists 130,080 of ice_text.model's 130,344 pieces).
/// </summary>
public sealed class SentencePieceModel
{
    private readonly Dictionary<string, int> _ids;

    private SentencePieceModel(List<SentencePiece> pieces, List<byte[]> pieceBytes, NormalizerSettings normalizer, TrainerSettings trainer)
    {
        Pieces = pieces;
        PieceBytes = pieceBytes;
        AddDummyPrefix = normalizer.AddDummyPrefix;
        RemoveExtraWhitespaces = normalizer.RemoveExtraWhitespaces;
        EscapeWhitespaces = normalizer.EscapeWhitespaces;
        PrecompiledCharsMap = normalizer.CharsMap;
        ModelType = trainer.ModelType;
        ByteFallback = trainer.ByteFallback;
        TreatWhitespaceAsSuffix = trainer.TreatWhitespaceAsSuffix;
        _ids = new Dictionary<string, int>(StringComparer.Ordinal);
        for (int i = 0; i < pieces.Count; i++) _ids.TryAdd(pieces[i].Piece, i);
        int firstByte = pieces.FindIndex(p => p.Type == PieceType.Byte);
        FirstByteId = firstByte;
    }

    /// <summary>Every piece, by id.</summary>
    public IReadOnlyList<SentencePiece> Pieces { get; }

    /// <summary>Whether a space is prepended to the text before encoding (proto default true).</summary>
    public bool AddDummyPrefix { get; }

    /// <summary>Whether runs of whitespace are collapsed by the normalizer (proto default true).</summary>
    public bool RemoveExtraWhitespaces { get; }

    /// <summary>TrainerSpec.model_type (1 = Unigram, 2 = BPE).</summary>
    public int ModelType { get; }

    /// <summary>Whether spaces become <c>▁</c> (U+2581) in the normalized text (proto default true).</summary>
    public bool EscapeWhitespaces { get; }

    /// <summary>Whether unknown characters are written as their UTF-8 byte pieces (TrainerSpec.byte_fallback).</summary>
    public bool ByteFallback { get; }

    /// <summary>TrainerSpec.treat_whitespace_as_suffix (the dummy space goes at the end instead).</summary>
    public bool TreatWhitespaceAsSuffix { get; }

    /// <summary>The normalizer's precompiled character map (a double-array trie and its replacement strings), or empty.</summary>
    internal byte[] PrecompiledCharsMap { get; }

    /// <summary>Every piece's exact UTF-8 bytes, by id.</summary>
    internal IReadOnlyList<byte[]> PieceBytes { get; }

    private readonly record struct NormalizerSettings(bool AddDummyPrefix, bool RemoveExtraWhitespaces, bool EscapeWhitespaces, byte[] CharsMap);

    private readonly record struct TrainerSettings(int ModelType, bool ByteFallback, bool TreatWhitespaceAsSuffix);

    /// <summary>The id of <c>&lt;0x00&gt;</c>, or −1 without byte fallback.</summary>
    public int FirstByteId { get; }

    /// <summary>The id of <paramref name="piece"/>, or −1.</summary>
    /// <param name="piece">The piece text.</param>
    /// <returns>Its id.</returns>
    public int IdOf(string piece) => _ids.TryGetValue(piece, out var id) ? id : -1;

    /// <summary>Parses a <c>.model</c> file's bytes.</summary>
    /// <param name="data">The file content.</param>
    /// <returns>The model.</returns>
    /// <exception cref="InvalidDataException">Not a SentencePiece model.</exception>
    public static SentencePieceModel Parse(ReadOnlySpan<byte> data)
    {
        var pieces = new List<SentencePiece>();
        var pieceBytes = new List<byte[]>();
        bool addDummyPrefix = true, removeExtra = true, escape = true, byteFallback = false, suffix = false;
        byte[] charsMap = Array.Empty<byte>();
        int modelType = 1;
        try
        {
            var r = new ProtoReader(data);
            while (!r.End)
            {
                var (field, wire) = r.Tag();
                if (field == 1 && wire == 2)
                {
                    var (piece, bytes) = ParsePiece(r.Bytes());
                    pieces.Add(piece);
                    pieceBytes.Add(bytes);
                }
                else if (field == 2 && wire == 2)
                {
                    var t = new ProtoReader(r.Bytes());
                    while (!t.End)
                    {
                        var (f, w) = t.Tag();
                        if (f == 3 && w == 0) modelType = (int)t.Varint();
                        else if (f == 24 && w == 0) suffix = t.Varint() != 0;
                        else if (f == 35 && w == 0) byteFallback = t.Varint() != 0;
                        else t.Skip(w);
                    }
                }
                else if (field == 3 && wire == 2)
                {
                    var n = new ProtoReader(r.Bytes());
                    while (!n.End)
                    {
                        var (f, w) = n.Tag();
                        if (f == 2 && w == 2) charsMap = n.Bytes().ToArray();
                        else if (f == 3 && w == 0) addDummyPrefix = n.Varint() != 0;
                        else if (f == 4 && w == 0) removeExtra = n.Varint() != 0;
                        else if (f == 5 && w == 0) escape = n.Varint() != 0;
                        else n.Skip(w);
                    }
                }
                else r.Skip(wire);
            }
        }
        catch (Exception ex) when (ex is IndexOutOfRangeException or ArgumentOutOfRangeException or OverflowException)
        {
            throw new InvalidDataException($"The SentencePiece model is truncated or corrupt ({ex.Message}).", ex);
        }
        if (pieces.Count == 0) throw new InvalidDataException("The file holds no SentencePiece pieces: not a SentencePiece model.");
        return new SentencePieceModel(pieces, pieceBytes, new NormalizerSettings(addDummyPrefix, removeExtra, escape, charsMap), new TrainerSettings(modelType, byteFallback, suffix));
    }

    private static (SentencePiece Piece, byte[] Bytes) ParsePiece(ReadOnlySpan<byte> data)
    {
        var r = new ProtoReader(data);
        byte[] bytes = Array.Empty<byte>();
        float score = 0;
        var type = PieceType.Normal;
        while (!r.End)
        {
            var (f, w) = r.Tag();
            if (f == 1 && w == 2) bytes = r.Bytes().ToArray();
            else if (f == 2 && w == 5) score = r.Fixed32();
            else if (f == 3 && w == 0) type = (PieceType)r.Varint();
            else r.Skip(w);
        }
        return (new SentencePiece(Encoding.UTF8.GetString(bytes), score, type), bytes);
    }

    /// <summary>A minimal protobuf reader (varint, fixed32/64, length-delimited).</summary>
    private ref struct ProtoReader(ReadOnlySpan<byte> data)
    {
        private readonly ReadOnlySpan<byte> _data = data;
        private int _pos;

        public readonly bool End => _pos >= _data.Length;

        public (int Field, int Wire) Tag()
        {
            ulong tag = Varint();
            return ((int)(tag >> 3), (int)(tag & 7));
        }

        public ulong Varint()
        {
            ulong result = 0;
            for (int shift = 0; shift < 64; shift += 7)
            {
                if (_pos >= _data.Length) throw new InvalidDataException("Truncated SentencePiece model (varint).");
                byte b = _data[_pos++];
                result |= (ulong)(b & 0x7F) << shift;
                if ((b & 0x80) == 0) return result;
            }
            throw new InvalidDataException("Malformed varint in the SentencePiece model.");
        }

        public float Fixed32()
        {
            if (_pos + 4 > _data.Length) throw new InvalidDataException("Truncated SentencePiece model (fixed32).");
            float v = BitConverter.ToSingle(_data.Slice(_pos, 4));
            _pos += 4;
            return v;
        }

        public ReadOnlySpan<byte> Bytes()
        {
            int length = checked((int)Varint());
            if (length < 0 || _pos + length > _data.Length) throw new InvalidDataException("Truncated SentencePiece model (length-delimited field).");
            var s = _data.Slice(_pos, length);
            _pos += length;
            return s;
        }

        public void Skip(int wire)
        {
            switch (wire)
            {
                case 0: Varint(); break;
                case 1: _pos += 8; break;
                case 2: Bytes(); break;
                case 5: _pos += 4; break;
                default: throw new InvalidDataException($"Unsupported protobuf wire type {wire} in the SentencePiece model.");
            }
            if (_pos > _data.Length) throw new InvalidDataException("Truncated SentencePiece model.");
        }
    }
}
