"""Write Hugging Face tokenizer files for moegen checkpoints.

Two kinds exist:

* ``"bpe"``: a tiny (512-id) byte-level BPE trained in-process on a built-in
  corpus, for tiny test models whose embedding tables must stay small.
* ``"mixtral"``: the real 32000-piece Mistral/Mixtral SentencePiece vocabulary
  shipped inside the mistral-common wheel, converted to a ``tokenizer.json``.

Either way the output directory loads offline with
``transformers.AutoTokenizer.from_pretrained`` as a fast tokenizer, prepends
``<s>`` by default, and carries the caller's chat template.  ``tokenizer.json``
is self-contained (BOS post-processor included) so engines that read it with
the ``tokenizers`` library directly get the same ids as transformers.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

__all__ = ["TokenizerInfo", "write_tokenizer"]

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
BPE_VOCAB_SIZE = 512
MIXTRAL_VOCAB_SIZE = 32000
_SPM_SPACE = "\u2581"  # SentencePiece's visible space, "▁"
_MISTRAL_SPM_FILE = "mistral_common/data/tokenizer.model.v1"

# Varied English so the 253 learned merges cover common words, punctuation,
# digits and line breaks; content is irrelevant beyond that.
_BPE_CORPUS = """\
The quick brown fox jumps over the lazy dog.
A journey of a thousand miles begins with a single step.
She sells sea shells by the sea shore, doesn't she?
In 1969, two astronauts walked on the Moon for about 21 hours.
Please remember to buy milk, eggs, bread and 3 apples.
"Where are you going?" he asked. "Home," she said.
The meeting starts at 10:30 AM on Tuesday, March 4th.
Water boils at 100 degrees Celsius at sea level.
It was the best of times, it was the worst of times.
The mixture of experts routes each token to two of eight experts.
Every expert is a small feed-forward network with its own weights.
Attention lets the model look back at earlier tokens in the sequence.
Hello, world! This is a test of the tokenizer.
I think, therefore I am.
To be, or not to be: that is the question.
The price rose from $12.50 to $15.75 (an increase of 26%).
Call me at 555-0100 or send an e-mail to info@example.com.
Once upon a time there was a little girl who lived in a village.
The weather today is sunny with a high of 24 and a low of 13.
def add(a, b):
    return a + b
for i in range(10):
    print(i * i)
Lists: one; two; three... and so on!
What is the capital of France? The capital of France is Paris.
How many legs does a spider have? A spider has eight legs.
The cat sat on the mat, and the dog slept by the door.
Learning a new language takes time, patience and practice.
Numbers like 0, 1, 2, 3, 4, 5, 6, 7, 8 and 9 appear everywhere.
They're going to the park because it's a beautiful day.
The library opens at nine o'clock and closes at five.
Scientists discovered a new species of frog in the rainforest.
Café, naïve and résumé are English words with accents.
Tokyo (東京) is the capital of Japan (日本).
My favourite colours are red, green and blue.
He wrote three letters, two reports and one long novel.
The train to London leaves from platform 7 every hour.
Can you help me with my homework, please?
Yes, of course. Let's start with the first question.
Thank you very much for your help!
"""


@dataclass(slots=True, frozen=True)
class TokenizerInfo:
    """Facts about written tokenizer files that a model config needs."""

    vocab_size: int  # number of ids the tokenizer can emit (len(tokenizer))
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int | None


def write_tokenizer(out_dir: Path, kind: Literal["bpe", "mixtral"], chat_template: str) -> TokenizerInfo:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into ``out_dir``.

    ``chat_template`` is a Jinja template stored in tokenizer_config.json.  For
    ``kind="mixtral"`` the original ``tokenizer.model`` is copied alongside;
    loading never needs sentencepiece.  Output is byte-identical across calls.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if kind == "bpe":
        tokenizer = _train_bpe()
        # A tokenizer.model left by an earlier "mixtral" write would describe a different vocabulary.
        (out_dir / "tokenizer.model").unlink(missing_ok=True)
    elif kind == "mixtral":
        spm_path = _mistral_spm_path()
        tokenizer = _convert_mixtral(spm_path)
        shutil.copyfile(spm_path, out_dir / "tokenizer.model")
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected 'bpe' or 'mixtral'")
    _set_bos_post_processor(tokenizer)
    tokenizer.save(str(out_dir / "tokenizer.json"), pretty=True)
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config(tokenizer, chat_template))
    _write_json(out_dir / "special_tokens_map.json", {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK})
    return _info(tokenizer)


def _train_bpe() -> Tokenizer:
    """Train the tiny byte-level BPE: 3 specials + 256 bytes + 253 merges = 512 ids."""
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    # add_prefix_space=False keeps decode(encode(text)) == text; the regex split is GPT-2's.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        special_tokens=[UNK, BOS, EOS],  # ids 0, 1, 2 as in Llama/Mixtral
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable, no <unk> ever
        show_progress=False,
    )
    tokenizer.train_from_iterator(_BPE_CORPUS.splitlines(keepends=True), trainer=trainer)
    return tokenizer


def _mistral_spm_path() -> Path:
    """Locate tokenizer.model.v1 inside the installed mistral-common wheel."""
    try:
        path = Path(str(resources.files("mistral_common") / "data" / "tokenizer.model.v1"))
    except ModuleNotFoundError as exc:
        raise RuntimeError(
            f"kind='mixtral' needs {_MISTRAL_SPM_FILE} from the mistral-common package, which is not "
            "installed; run `pip install mistral-common`"
        ) from exc
    if not path.is_file():
        raise RuntimeError(
            f"{_MISTRAL_SPM_FILE} not found at {path}; reinstall with `pip install --force-reinstall mistral-common`"
        )
    return path


def _convert_mixtral(spm_path: Path) -> Tokenizer:
    """Rebuild the SentencePiece BPE model as a `tokenizers` BPE with byte fallback."""
    pieces, scores, normal = _read_spm(spm_path)
    vocab = {piece: i for i, piece in enumerate(pieces)}
    merges = _spm_merges(pieces, scores, normal)
    model = models.BPE(vocab=vocab, merges=merges, unk_token=UNK, fuse_unk=True, byte_fallback=True)
    tokenizer = Tokenizer(model)
    # A normalizer rather than a Metaspace pre-tokenizer: Metaspace skips the dummy
    # prefix when text already starts with a space (" hi" -> "▁hi", SentencePiece gives
    # "▁▁hi"), and a normalizer runs on each chunk between special tokens, so
    # "<s>[INST]" gets "▁[INST]" exactly as mistral-common encodes chats.
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend(_SPM_SPACE), normalizers.Replace(" ", _SPM_SPACE)]
    )
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace(_SPM_SPACE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),  # drop the dummy prefix again
        ]
    )
    tokenizer.add_special_tokens([UNK, BOS, EOS])  # already ids 0-2; marks them special/unnormalized
    return tokenizer


def _read_spm(spm_path: Path) -> tuple[list[str], list[float], list[bool]]:
    """Return every piece by id, its score, and whether it is an ordinary (mergeable) piece."""
    try:
        import sentencepiece  # only needed while writing, never when loading
    except ModuleNotFoundError as exc:
        raise RuntimeError(f"reading {spm_path} needs sentencepiece; run `pip install sentencepiece`") from exc
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_path))
    size = sp.get_piece_size()
    if size != MIXTRAL_VOCAB_SIZE or (sp.bos_id(), sp.eos_id()) != (1, 2):
        raise RuntimeError(
            f"{spm_path} has {size} pieces, BOS {sp.bos_id()}, EOS {sp.eos_id()}; expected the "
            f"{MIXTRAL_VOCAB_SIZE}-piece Mixtral vocabulary with BOS 1 and EOS 2 (mistral-common changed?)"
        )
    ids = range(size)
    pieces = [sp.id_to_piece(i) for i in ids]
    scores = [sp.get_score(i) for i in ids]
    normal = [not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i)) for i in ids]
    return pieces, scores, normal


def _spm_merges(pieces: list[str], scores: list[float], normal: list[bool]) -> list[tuple[str, str]]:
    """Derive BPE merges that reproduce SentencePiece's segmentation.

    Every split of a piece into two pieces is a merge.  SentencePiece merges the
    highest-scoring pair first, leftmost on ties, so merges are ranked by score.
    The whitespace-run pieces ("▁▁", "▁▁▁", ...) all share a score of -1e9 and
    are not in id order; ranking equal scores longer-left-part first makes runs
    grow from the left, as SentencePiece's leftmost tie-break does.  Byte and
    control pieces are excluded so literal text like "<0x0A>" never merges into
    the newline byte token.
    """
    vocab = {piece: i for i, piece in enumerate(pieces)}
    ranked = []
    for piece_id, piece in enumerate(pieces):
        if not normal[piece_id]:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if normal[vocab.get(left, 0)] and normal[vocab.get(right, 0)]:  # id 0 is <unk>: not normal
                ranked.append((-scores[piece_id], -len(left), piece_id, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _set_bos_post_processor(tokenizer: Tokenizer) -> None:
    """Prepend <s> to every sequence, as Llama/Mixtral tokenizers do."""
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]
    )


def _tokenizer_config(tokenizer: Tokenizer, chat_template: str) -> dict[str, Any]:
    """tokenizer_config.json contents; tokenizer.json stays the source of truth."""
    added = {
        str(tokenizer.token_to_id(token)): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token in (UNK, BOS, EOS)
    }
    return {
        # Generic class: loads tokenizer.json verbatim (a model-specific class would
        # rebuild its own pipeline) and exists in transformers 4.x and 5.x alike.
        "tokenizer_class": "PreTrainedTokenizerFast",
        # transformers 5 defaults add_bos_token to False and then rewrites the
        # post-processor from these flags, so they must be explicit.
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "pad_token": None,
        "clean_up_tokenization_spaces": False,  # would alter " ." etc. and break round trips
        "added_tokens_decoder": added,
        "chat_template": chat_template,
    }


def _info(tokenizer: Tokenizer) -> TokenizerInfo:
    return TokenizerInfo(
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
        bos_token_id=tokenizer.token_to_id(BOS),
        eos_token_id=tokenizer.token_to_id(EOS),
        pad_token_id=None,  # Mixtral ships without a pad token; callers pick one if they batch
    )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
