using System.Text;

namespace MinLora.Glm.Tokenization;

/// <summary>
/// Text from SentencePiece pieces, as SentencePiece decodes: byte pieces gathered and decoded as UTF-8 together, ▁ as a
/// space (the first piece's dummy-prefix space dropped), unknown as " ⁇ ", control pieces and the caller's special
/// tokens kept or skipped. Shared by the ChatGLM-6B and ChatGLM2/3 tokenizers (which differ only in how ids map to
/// pieces and specials).
/// </summary>
internal sealed class PieceText(SentencePieceModel model, bool skipSpecialTokens)
{
    private readonly StringBuilder _text = new();
    private readonly List<byte> _bytes = [];
    private bool _first = true;

    /// <summary>A special token's text (kept unless special tokens are skipped).</summary>
    public void AppendSpecial(string text)
    {
        Flush();
        if (!skipSpecialTokens) _text.Append(text);
    }

    /// <summary>The piece at <paramref name="index"/> of the model.</summary>
    public void AppendPiece(int index)
    {
        var p = model.Pieces[index];
        switch (p.Type)
        {
            case PieceType.Byte:
                _bytes.Add(Convert.ToByte(p.Piece.Substring(3, 2), 16));
                _first = false;
                return;
            case PieceType.Control:
                AppendSpecial(p.Piece);
                return;
            case PieceType.Unknown:
                Flush();
                _text.Append(" \u2047 ");
                break;
            default:
                Flush();
                var piece = p.Piece.Replace('\u2581', ' ');
                if (_first && model.AddDummyPrefix && piece.StartsWith(' ')) piece = piece[1..];
                _text.Append(piece);
                break;
        }
        _first = false;
    }

    /// <summary>The text so far (pending bytes decoded).</summary>
    public override string ToString()
    {
        Flush();
        return _text.ToString();
    }

    private void Flush()
    {
        if (_bytes.Count == 0) return;
        _text.Append(Encoding.UTF8.GetString(_bytes.ToArray()));
        _bytes.Clear();
    }
}
