"""CLIP's tokenizer as a Hugging Face `tokenizer.json`, built offline from
open_clip's own vocabulary file (`bpe_simple_vocab_16e6.txt.gz`, inside the
open_clip_torch wheel), the way transformers' CLIPConverter builds it:
NFC, whitespace runs to one space, lower case; CLIP's word pattern,
byte-level; BPE with `</w>`; RobertaProcessing with <|startoftext|> (49406)
and <|endoftext|> (49407). Kalon's `clip-bpe` tokenizer reads the file.

Needs only the `tokenizers` package.
"""
import gzip

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

SOT, EOT = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def build(bpe_gz):
    """The tokenizer, from open_clip's `bpe_simple_vocab_16e6.txt.gz`."""
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + [SOT, EOT]
    vocab = {t: i for i, t in enumerate(vocab)}
    assert len(vocab) == 49408 and vocab[SOT] == 49406 and vocab[EOT] == 49407
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                        end_of_word_suffix="</w>", fuse_unk=False, unk_token=EOT))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.RobertaProcessing((EOT, 49407), (SOT, 49406), add_prefix_space=False, trim_offsets=False)
    tok.add_special_tokens([AddedToken(SOT, special=True, normalized=False), AddedToken(EOT, special=True, normalized=False)])
    return tok


def ids(tok, texts, context=77, pad_id=0):
    """Ids as Kalon's `clip-bpe` gives them: [batch, context], int64-ready lists."""
    tok.enable_truncation(max_length=context)
    tok.enable_padding(length=context, pad_id=pad_id, pad_token="!")
    return [e.ids for e in tok.encode_batch(list(texts))]
