"""Token counting: exact length decisions, with token counts, and the work cut where it provably is
not needed.

`n_tokens` is the number of tokens of the text alone (no special tokens: no BOS, no EOS), exactly what
`tokenizer.encode(text, add_special_tokens=False)` gives. The length filter's decisions are always
those of counting every text. A count is exact wherever one is given; a text that an upper bound (3.)
proves kept is not counted at all unless prepare runs with --exact-counts. Without it prepare writes no
count for any kept text (`n_tokens` null in the candidates, whichever way it was decided: the way
depends on the caches' state and on measured time, the output must not), and balancing and
statistics say what they use instead. The counting shortcuts are all exact:

0. Counting by chunks of the raw text ("chunks", the first choice). `space_cuts.py` proves from the
   tokenizer's structure that cutting the raw text before a space that follows a printable ASCII
   character changes no count (its normalizer is local at such a space, no piece of its split regex
   and no vocabulary entry can hold the two characters, no lookahead crosses). Then n(text) = the
   first chunk's count + the cached counts of the following chunks, each chunk counted once by the
   real tokenizer in a fixed context: no normalization, split or model call per document, a plain
   `str.split(" ")` and a dictionary look-up per chunk. Proved for Llama-2's structure, byte-level
   BPE with a split regex (Llama-3, Qwen, tekken, GPT-2) and NFKC sentencepiece conversions.
   The chunks a text misses in the cache are counted in one input per text, its "remainder" (its
   missed chunks joined at cuts: never more characters than the text), except those missed often
   enough to be worth caching, counted alone (`TokenCounter._finish`, `chunk_cache.worth_caching`). A
   remainder is R = x + " " + k1 + " " + k2 ... + " " + km, the ki the text's missed chunks left
   uncached (numbers, names, URLs: most never come back) in text order, x its first chunk when that one
   is among them, else the fixed context ctx. Every ki but the last is followed by a cut in the text,
   so it ends with a character of `cut_after`, and so does x (ctx is one; a first chunk followed by
   others is): R's spaces after x..k(m-1) are cuts, and n(R) = n(x) + the sum of the ki's counts after
   a cut, exactly as the text's own chunks add up (the text's last chunk, the only one that may end
   otherwise or be empty, stays last). On text whose chunks rarely repeat (tables, code, identifiers)
   the look-ups are then mostly wasted: the counter measures both paths as it goes and tokenizes whole
   batches in full while that is cheaper, probing back from time to time (`CostSwitch`). Every path is
   exact; the choice moves only time. For Llama-2's structure (Prepend("▁") + Replace(" ", "▁"), no
   pre-tokenizer, no added token holding "▁") the remainders and chunks are normalized in Python and
   encoded by a copy of the tokenizer without a normalizer (`shape.pieces_encoder`): the same
   tokens for a text without an added token's content, which every chunk-path input is.
1. Counting by words, memoized, when no chunk cut is proved. A Hugging Face tokenizer encodes a
   text (without added tokens) as normalizer -> pre-tokenizer -> model, and the model encodes each
   pre-token on its own. So n(text) = sum of n_model(w) over the words w of normalize(text), where
   the words are

   - "pretokens": the pre-tokenizer's pieces, for any tokenizer that has a pre-tokenizer (byte-level
     BPE with a split regex: Llama-3, Qwen, tekken, GPT-2; Metaspace(split=True) sentencepiece
     conversions, NFKC-normalized ones included). The tokenizer's own normalizer (Rust) normalizes, so
     any normalizer is handled exactly; its pre-tokenizer (Rust) splits, except a lone Metaspace("▁"),
     whose few string operations (see `shape.metaspace`) are done in Python, several times faster than
     the Rust call that also builds offsets.
   - "cuts": Llama-2's structure (no pre-tokenizer: the whole normalized text is one BPE word; e.g.
     normalizer Prepend("▁") + Replace(" ", "▁"), byte fallback). The normalized text is cut before
     every "▁" that follows a character other than "▁" (a run of "▁" stays with the word after it).
     No BPE token can straddle such a cut when no vocabulary entry and no merge contains a character
     other than "▁" directly followed by "▁": merges only ever join adjacent symbols into a vocabulary
     entry, so the two sides are merged independently, and byte fallback is per character. This is
     proved by a scan of the vocabulary and merges when the counter is built; it also requires no
     dropout, no continuing-subword prefix or end-of-word suffix (they depend on the word start) and
     "▁" in the vocabulary (so an unknown-token fusion cannot cross a cut). A lone Metaspace("▁",
     split=False) pre-tokenizer (transformers' non-legacy Llama conversion) is cut the same way.

   Word counts are cached, so a document costs a normalization, a split and a few dictionary look-ups
   per word instead of a BPE pass; misses are encoded in one batch by the bare model. Texts that
   contain an added (special) token's content, raw or normalized, are counted in full.
2. A lower bound rejects texts that cannot fit without tokenizing them (computed only for texts
   long enough to reach the limit): every token of a BPE model
   with byte fallback (all 256 byte pieces) or a byte-level one covers at most B units of the model's
   input (UTF-8 bytes; bytes for byte-level), B being the longest vocabulary entry in those units, and
   the pre-tokenizers allowed (Metaspace, ByteLevel, Split without removal) never shorten it, so
   n >= ceil(bytes(normalize(text)) / B).

3. An upper bound keeps texts that cannot exceed the limit without tokenizing them (`upper_bound`,
   `UpperBound`; `judge` uses it unless told to count every kept text). For a BPE model without a
   subword prefix or suffix, each character of a pre-tokenized word is one initial symbol when the
   vocabulary holds it, else, with byte fallback, one token per UTF-8 byte of it (all bytes in the
   vocabulary), else one unknown token (or none); merges only join symbols. So a word's count is at
   most the sum of w(c) over its characters, w(c) <= bytes(c), and w("▁") = 1 when "▁" is in the
   vocabulary. A byte-level pre-tokenizer maps each byte of its input to one character, so there
   w = 1 per byte of the normalized text (with byte fallback only when all 256 byte characters are in
   the vocabulary: else a missing one would fall back to its 2 UTF-8 bytes). Splits (Split, Digits,
   Punctuation, the split of Metaspace and ByteLevel) add no character, and whatever they remove only
   lowers the count. What adds: Metaspace's " " -> "▁" (1 byte for a token: free), its prepended "▁"
   (+1, once per text: "always" only as the first step, else it would prepend to every piece), and
   ByteLevel's prefix space (+1, likewise only as the first step). An added token's content in the text
   is one token, but it cuts the text into pieces that are normalized and pre-tokenized apart (each
   with its own prepend), so a text holding one (`_has_special`, raw) gets no bound and is counted;
   tokens matched after normalization do not restart normalization, and are allowed unless a
   pre-tokenizer prepends to every piece. Hence, per structure:

   - byte-level BPE (Llama-3, Qwen, tekken, GPT-2): n <= bytes(normalize(text)) (+1 with a prefix space);
   - sentencepiece BPE with byte fallback in Llama-2's structure (Prepend("▁") + Replace(" ", "▁"), no
     pre-tokenizer): n <= bytes(text) + 1: the prepended "▁" is one token, each space becomes a "▁" of
     one token, every other character is at most its bytes; the normalized text's own bytes are no
     bound here (a space becomes 3 bytes);
   - Metaspace conversions: the same, + 1 for a prepending scheme.

   The normalized text is never computed when the normalizer leaves the text's bytes as they are or
   the bound covers its change: none; Prepend("▁") (+1) and Replace(" ", "▁") (free: the "▁" is one
   token); NFC, NFD, NFKC, NFKD and Lowercase on an ASCII text (each maps it to itself, Lowercase to
   as many ASCII characters). Otherwise (such a normalizer and a non-ASCII text) the bound is taken of
   the normalized text, whose bytes may exceed the original's (NFC of U+0958 is 6 bytes for 3, NFKC
   of U+FDFA 33 for 3), each "▁" of it counted once. Any other normalizer, pre-tokenizer or model
   (Unigram, WordPiece, a Precompiled sentencepiece normalizer, a Replace of anything else) has no
   upper bound (`TokenizerShape.upper_why` says why): its texts are counted. The bound is sound
   whatever the tokenizer's merges; tests/test_length.py checks it against full tokenization with
   the real vocabularies on emoji, CJK, combining marks, runs of spaces, control characters and "▁".

4. A long text is counted a prefix first (`cut_past`, CHUNKS only): at a proved cut i (a space after
   a character of `cut_after`), n(text) = n(text[:i]) + the counts of the following chunks after a cut
   (0.), each the number of tokens of that chunk in context, never negative; so n(text[:i]) > limit
   proves the text too long without counting the rest. When it does not (a text sparser in tokens
   than the prefix was sized for), the rest is counted from the cut, n(ctx + text[i:]) - n(ctx) (as a
   remainder is: `_finish`), and the two add up to n(text): no work is lost. `judge` cuts a text of
   more than 4.5 characters a token of the limit; one that holds an added token's content is counted
   whole, as on the chunk path. The same sum keeps a text uncounted (`cut_to_keep`, without
   --exact-counts): the rest's count n(ctx + text[i:]) - n(ctx) is at most upper_bound(ctx + text[i:])
   - n(ctx) (3.), so n(text[:i]) + that <= limit proves the text kept; `judge` cuts a text whose bytes
   exceed the limit where a prefix at 4 characters a token and the rest at a token a byte would fit.

5. The chunk caches bound a text with no tokenizer call (`chunk_bounds`, CHUNKS only): n(text) is the
   sum of its chunks' counts in context (0.); the cached ones are exact, and a missed one's is at
   least 1 where every byte is some token's (2.: a following chunk is " " + its text between two
   proved cuts, its tokens are its own and cover that space; else at least 0) and at most its bytes
   + 1 where the bound of 3. is taken of the raw text (3.'s per-character bound on the piece " " +
   chunk, which the cut makes tokenized apart: the space is one token at most, " " or "▁", each other
   character at most its bytes; a prepended "▁" or a prefix space is the text's start's, counted in
   its first chunk), else upper_bound(ctx + " " + chunk) - n(ctx) (3.); the first chunk's, >= 0 and
   at most upper_bound(chunk). So the cached counts and a token per missed chunk are a lower bound (over the limit: too long, whatever the misses count),
   and with the misses' bounds added an upper bound (within the limits: kept). A long text is looked
   up in a prefix of its chunks only (a lower bound needs no more). `judge` tries these first.

6. A share of the missed chunks counted decides a text (`stepwise.py`, CHUNKS, while the cost switch
   counts by chunks; it replaces 4. and 5. there). A text is looked up once: its cached chunks' counts
   are exact, and each missed chunk is bounded as in 5. Any of its missed chunks, in text order, are
   one remainder (0.: each but the last is followed by a cut in the text, so it ends with a character
   of `cut_after`), whose count less n(ctx) is exactly the sum of theirs after a cut; so with S such
   a set counted, n(text) = known + n(S) + the others', each of which is at least 1 (0 the first
   chunk) and at most its upper bound in context. The text is dropped when known + n(S) + the others'
   lower bounds exceed the limit, kept uncounted when known + n(S) + their upper bounds fit, and
   otherwise the others are counted too, one more remainder whose count adds up to the exact n(text):
   no work is lost. S is sized from the tokens a missed character has cost so far, for the bound the
   text likely meets (drop or keep) with a margin, so that one round usually decides; a text whose
   guess is near the limit is counted whole at once. The sizes move only time, never a decision or a
   count. A long text is looked up in a prefix first (the first `_LOOKUP_CHARS` characters a token of
   the limit), whose cached counts and a token per missed chunk usually prove it too long already.

Any other tokenizer (BPE with dropout, or one word per text that no cut rule splits) is counted in full
with `encode_batch_fast`, exact by definition. tests/test_length.py proves each path against full
tokenization on texts built to break it, with converted real vocabularies (benchmarks/real_tokenizers.py).

The modules, from the bottom up (each imports only those above it):
    space_cuts.py   where a raw text can be cut before a space without changing its count (0.)
    shape.py        what a tokenizer's structure allows: the counting path, the bounds (2., 3.), the proof
    cost.py         CostSwitch: chunks or full tokenization, batch by batch, from measured costs (0.)
    chunk_cache.py  which missed chunks are cached, and how a full cache is trimmed
    stepwise.py     the chunk path's decisions by a share of the missed chunks (6.), inherited by...
    counter.py      TokenCounter: exact counts by the cheapest exact path, the bounds, the prefix cut (4.)
    load.py         the tokenizer loaded, fingerprinted and proved once per process, shared by threads
    judge.py        the length filter on a batch in one call, and its verdict
    paper_tokens.py token counts in the paper's unit (Llama-2's structure), for the report

Nothing is imported here: each caller imports the module it needs.
"""
