"""Sentencepiece BPE tokenizer: training, loading, encoding, decoding.

Every nanobumble tokenizer has the same four fixed ids:

    0  <unk>
    1  <|endoftext|>   appended after every pretraining document
    2  <|im_start|>    chat turn start
    3  <|im_end|>      chat turn end

The three specials are sentencepiece *control* symbols: `encode` never
produces them, even when the text literally contains "<|im_end|>", so user
data cannot forge a chat turn. They enter a sequence only by id, and `decode`
writes them back as their literal strings.

Encoding is lossless: decode(encode(text)) == text for any UTF-8 text
(identity normalisation, no dummy prefix, whitespace kept, and byte fallback
so that characters never seen in training become their UTF-8 bytes).
Sentencepiece stores spaces as U+2581 '▁', so a literal '▁' in the text would
come back as a space; `encode` therefore writes that one character as its
three byte tokens.

The characters that make up 99.95% of the training text each get a token of
their own. When they do not fit in vocab_size (a Chinese corpus with thousands
of rare characters), training is run again with only the most frequent
characters, and the rarer ones are written as their UTF-8 bytes.
"""

import hashlib
import io
import multiprocessing
import os
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from nanobumble.base.errors import ConfigError, DataError
from nanobumble.base.files import atomic_write_bytes
from nanobumble.data.hf_tokenizer import HFTokenizer

UNK_ID = 0
EOT_ID = 1
IM_START_ID = 2
IM_END_ID = 3
SPECIAL_TOKENS = {"<|endoftext|>": EOT_ID, "<|im_start|>": IM_START_ID, "<|im_end|>": IM_END_ID}
SPECIAL_IDS = frozenset(SPECIAL_TOKENS.values())

SPACE_PIECE = "\u2581"  # how sentencepiece writes a space inside a piece
FIXED_PIECES = 1 + len(SPECIAL_TOKENS) + 256  # <unk>, the specials and the 256 byte-fallback tokens
MIN_VOCAB_SIZE = FIXED_PIECES + 16  # and room for at least a few characters of the text
MAX_LINE_CHARS = 8192  # longer lines are cut into pieces of this size for training
MAX_TRAINING_LINES = 5_000_000  # sentencepiece samples this many lines at most
TRAIN_THREADS = 8  # fixed, not os.cpu_count(): the count is stored in the model file


def _training_lines(texts: Iterable[str], errors: list[Exception], left_out: dict[int, str]) -> Iterator[str]:
    """Cut documents into lines (newlines become byte tokens, never pieces). The
    characters in left_out end a line too, so they never enter the vocabulary.

    An exception raised while reading texts is kept in `errors`: sentencepiece
    would otherwise turn it into a generic RuntimeError.
    """
    try:
        for text in texts:
            if left_out:
                text = text.translate(left_out)
            for line in text.split("\n"):
                for start in range(0, len(line), MAX_LINE_CHARS):
                    yield line[start:start + MAX_LINE_CHARS]
    except Exception as e:
        errors.append(e)
        raise


class _TooManyCharacters(Exception):
    """Sentencepiece refused: the characters of the text do not fit in vocab_size."""


def train_tokenizer(texts: Iterable[str] | Callable[[], Iterable[str]], vocab_size: int, model_path: str) -> str:
    """Train a BPE tokenizer on documents and write it to model_path.

    texts: the documents, or a function returning them. They are read again when
    their characters do not fit in vocab_size: then only the most frequent ones
    get a token (as many as half the tokens left after the fixed ones; the other
    half are for longer pieces), and the rarer ones fall back to bytes.
    (Sentencepiece's own character_coverage cannot go below 0.98, which leaves
    too many characters when a text has a long tail of rare ones.)

    The same input gives the same model file. When the text is too small to
    fill vocab_size, the model simply comes out smaller (the real size is printed).
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(f"vocab_size={vocab_size} is too small: a tokenizer needs at least {MIN_VOCAB_SIZE} "
                          f"tokens ({FIXED_PIECES} fixed ones: <unk>, {len(SPECIAL_TOKENS)} specials and 256 "
                          "bytes, then the characters of the text)")
    too_small = ConfigError(f"vocab_size={vocab_size} is too small for the characters of this text")
    read_texts = texts if callable(texts) else lambda: texts
    start = time.time()
    try:
        model = _train_model(read_texts(), vocab_size, left_out={})
    except _TooManyCharacters:
        if not callable(texts) and iter(texts) is texts:  # a one-shot iterator: nothing left to read again
            raise too_small from None
        char_counts: Counter = Counter()
        for text in read_texts():
            char_counts.update(text)
        char_counts.pop("\n", None)  # a newline ends a training line; it is not one of its characters
        frequent = char_counts.most_common((vocab_size - FIXED_PIECES) // 2)
        coverage = sum(count for _, count in frequent) / sum(char_counts.values())
        # The space stays whatever its count: as a byte token it would decode to '▁', not to a space.
        rare = char_counts.keys() - {char for char, _ in frequent} - {" "}
        print(f"tokenizer: the text's {len(char_counts):,} distinct characters do not fit in "
              f"vocab_size={vocab_size}; character coverage {coverage:.2%}: the {len(frequent):,} most "
              f"frequent get tokens, the {len(rare):,} rarer ones are written as UTF-8 bytes")
        try:
            model = _train_model(read_texts(), vocab_size, left_out=dict.fromkeys(map(ord, rare), "\n"))
        except _TooManyCharacters:
            raise too_small from None

    os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
    atomic_write_bytes(model_path, model)
    real_size = spm.SentencePieceProcessor(model_file=model_path).get_piece_size()
    print(f"tokenizer: trained vocab_size={real_size} (asked {vocab_size}) "
          f"in {time.time() - start:.1f}s -> {model_path}")
    return model_path


def _train_model(texts: Iterable[str], vocab_size: int, left_out: dict[int, str]) -> bytes:
    """One sentencepiece training run (see _training_lines); the model file's bytes."""

    specials = sorted(SPECIAL_TOKENS, key=SPECIAL_TOKENS.get)
    model = io.BytesIO()
    reading_errors: list[Exception] = []
    spm.set_random_generator_seed(0)  # line sampling on large corpora is reproducible
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(texts, reading_errors, left_out),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            unk_id=UNK_ID, bos_id=-1, eos_id=-1, pad_id=-1,
            control_symbols=specials,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            byte_fallback=True,
            character_coverage=0.9995,
            max_sentence_length=4 * MAX_LINE_CHARS,  # in bytes
            input_sentence_size=MAX_TRAINING_LINES,
            shuffle_input_sentence=True,
            num_threads=TRAIN_THREADS,
            minloglevel=2,  # sentencepiece's own log is long; we print one line
        )
    except RuntimeError as e:
        if reading_errors:
            raise reading_errors[0] from None
        if "sentences_.empty()" in str(e):
            raise DataError("cannot train a tokenizer: the training text is empty") from None
        if "required_chars" in str(e):
            raise _TooManyCharacters() from None
        raise ConfigError(f"cannot train a tokenizer with vocab_size={vocab_size}: {e}") from None
    return model.getvalue()


class Tokenizer:
    """A loaded nanobumble sentencepiece model."""

    def __init__(self, model_file: str):
        """Load model_file; a missing, unreadable or foreign file is a DataError naming it."""
        if not os.path.isfile(model_file):
            raise DataError(f"tokenizer model not found: {model_file}")
        try:
            with open(model_file, "rb") as f:
                model_bytes = f.read()
        except OSError as e:
            raise DataError(f"{model_file}: cannot read: {e}") from None
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        except RuntimeError:
            raise DataError(f"{model_file} is not a sentencepiece model") from None
        self.model_file = model_file
        # What a model directory keeps (save_model_dir); in memory, since the file may
        # be in a checkpoint that rotation later deletes.
        self.files = {"tokenizer.model": model_bytes}
        self.chat_template = None  # nanobumble's ChatML renderer (chat_template.py)
        self.checksum = hashlib.sha256(model_bytes).hexdigest()
        self.vocab_size = self.sp.get_piece_size()
        self.eot_id = EOT_ID
        self.im_start_id = IM_START_ID
        self.im_end_id = IM_END_ID
        problem = self._fixed_ids_problem()
        if problem:
            raise DataError(f"{model_file} is not a nanobumble tokenizer: {problem}")
        # A literal '▁' is encoded as its UTF-8 bytes so that it decodes to itself.
        self._space_piece_ids = [self._byte_id(b) for b in SPACE_PIECE.encode("utf-8")]

    def _fixed_ids_problem(self) -> str | None:
        """What is missing from the ids every nanobumble tokenizer has, or None."""
        expected = {"<unk>": UNK_ID, **SPECIAL_TOKENS}
        for piece, token_id in expected.items():
            found = self.sp.id_to_piece(token_id) if token_id < self.vocab_size else None
            is_special = token_id < self.vocab_size and (token_id == UNK_ID or self.sp.is_control(token_id))
            if found != piece or not is_special:
                return f"expected {piece!r} at id {token_id}, found {found!r}"
        if self.sp.piece_to_id("<0x00>") == UNK_ID:
            return "no byte fallback tokens"
        return None

    def _byte_id(self, value: int) -> int:
        return self.sp.piece_to_id(f"<0x{value:02X}>")

    def encode(self, text: str) -> list[int]:
        """Text -> token ids. Never returns the special ids."""
        if SPACE_PIECE not in text:
            return self.sp.encode(text)
        ids: list[int] = []
        for i, part in enumerate(text.split(SPACE_PIECE)):
            if i > 0:
                ids.extend(self._space_piece_ids)
            ids.extend(self.sp.encode(part))
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if any(SPACE_PIECE in text for text in texts):
            return [self.encode(text) for text in texts]
        return self.sp.encode(list(texts), num_threads=1)

    def decode(self, ids: Iterable[int]) -> str:
        """Token ids -> text. Special ids come back as their literal strings."""
        parts: list[str] = []
        run: list[int] = []  # decode ordinary ids together so byte tokens join into characters
        for token_id in ids:
            token_id = int(token_id)
            if token_id in SPECIAL_IDS:
                parts.append(self.sp.decode(run))
                parts.append(self.sp.id_to_piece(token_id))
                run = []
            else:
                run.append(token_id)
        parts.append(self.sp.decode(run))
        return "".join(parts)

    def token_byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes each token stands for inside decoded text (for bits per byte).

        0 for <unk> and the specials, 1 for a byte-fallback token, and '▁' counts
        as one space.
        """
        lengths = np.zeros(self.vocab_size, dtype=np.int32)
        for token_id in range(self.vocab_size):
            if self.sp.is_control(token_id) or self.sp.is_unknown(token_id):
                continue
            if self.sp.is_byte(token_id):
                lengths[token_id] = 1
            else:
                piece = self.sp.id_to_piece(token_id).replace(SPACE_PIECE, " ")
                lengths[token_id] = len(piece.encode("utf-8"))
        return lengths

    def __repr__(self) -> str:
        return f"Tokenizer({self.model_file!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str):
    """The tokenizer of a model directory, or of a tokenizer file: tokenizer.model
    (nanobumble's sentencepiece) or tokenizer.json (a Hugging Face model's, see
    hf_tokenizer.py). Both give the same interface."""
    if os.path.isdir(path):
        for name in ("tokenizer.model", "tokenizer.json"):
            if os.path.isfile(os.path.join(path, name)):
                return load_tokenizer(os.path.join(path, name))
        raise DataError(f"{path}: no tokenizer.model or tokenizer.json")
    if os.path.basename(path) == "tokenizer.json":
        return HFTokenizer(os.path.dirname(path) or ".")
    return Tokenizer(path)


def has_tokenizer(directory: str) -> bool:
    return any(os.path.isfile(os.path.join(directory, name)) for name in ("tokenizer.model", "tokenizer.json"))


def sample_texts(texts: Iterable[str], corpus_bytes: int, sample_bytes: int, seed: int = 0) -> Iterator[str]:
    """A seeded sample of about sample_bytes of the documents, and never more: each
    document is kept with probability sample_bytes / corpus_bytes (all of them
    when the corpus is smaller). Sentencepiece holds its training text in memory
    (about 20x its size at vocab 32K), so this bounds the memory of tokenizer
    training whatever the size of the corpus."""
    keep = min(1.0, sample_bytes / max(corpus_bytes, 1))
    rng = random.Random(seed)
    taken = 0
    for text in texts:
        if keep < 1.0 and rng.random() >= keep:
            continue
        taken += len(text.encode("utf-8"))
        if taken > sample_bytes:
            return
        yield text


def load_or_train_tokenizer(
    tokenizer_path: str | None,
    texts_fn: Callable[[], Iterable[str]],
    vocab_size: int,
    cache_dir: str,
    cache_key: str,
    corpus_bytes: int = 0,
    sample_mb: float = 0.0,
) -> Tokenizer:
    """Load tokenizer_path (a .model file or a directory holding tokenizer.model),
    or, when it is empty, train on texts_fn() once and keep the result in cache_dir.
    sample_mb > 0: train on a sample of that many MB of a corpus_bytes corpus."""
    if tokenizer_path:
        return load_tokenizer(tokenizer_path)

    sample_bytes = int(sample_mb * 2**20)
    sampled = 0 < sample_bytes < corpus_bytes
    suffix = f"-sample{sample_mb:g}mb" if sampled else ""
    model_path = os.path.join(cache_dir, f"tokenizer-{cache_key}-{vocab_size}{suffix}.model")
    if os.path.isfile(model_path):
        print(f"tokenizer: reusing cached {model_path}")
        return Tokenizer(model_path)
    if sampled:
        print(f"tokenizer: training on a seeded sample of about {sample_mb:g} MB of the {corpus_bytes / 2**20:,.0f} MB "
              f"corpus (tokenizer_sample_mb)")
        train_tokenizer(lambda: sample_texts(texts_fn(), corpus_bytes, sample_bytes), vocab_size, model_path)
    else:
        train_tokenizer(texts_fn, vocab_size, model_path)  # the function: it may need to read twice
    return Tokenizer(model_path)


def map_in_workers(work: Callable, chunks: Iterable, num_workers: int, init: Callable, initargs: tuple = ()
                   ) -> Iterator:
    """work(chunk) for each chunk, the results in order: in this process when
    num_workers <= 1, else in a pool of num_workers processes, each set up once by
    init(*initargs) (to load its tokenizer). At most 2 x num_workers chunks are in
    flight, so memory stays flat however many chunks come. The one process pool
    that tokenizes data, for the shards and for the SFT / DPO token cache."""
    if num_workers <= 1:
        init(*initargs)
        for chunk in chunks:
            yield work(chunk)
        return
    with multiprocessing.Pool(num_workers, initializer=init, initargs=initargs) as pool:
        in_flight: deque = deque()
        for chunk in chunks:
            in_flight.append(pool.apply_async(work, (chunk,)))
            if len(in_flight) >= 2 * num_workers:
                yield in_flight.popleft().get()
        while in_flight:
            yield in_flight.popleft().get()
