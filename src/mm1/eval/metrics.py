"""Captioning and VQA metrics as the field computes them.

- CIDEr-D exactly as `pycocoevalcap`'s `CiderScorer` (n = 4, σ = 6, idf over the evaluated set's
  references, ×10 — including its length term, which counts bigrams), in plain Python so no Java
  is needed; captions are first tokenized like COCO's PTB tokenizer (lower case, punctuation out).
- The official VQA accuracy: the official answer processing (punctuation, number words, articles,
  the full contraction table), then min(1, matches/3) averaged over the leave-one-out subsets of
  the reference answers.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict

# ----------------------------------------------------------------------------- CIDEr-D

_PTB_PUNCT = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
              "...", ";"}


def coco_tokenize(text: str) -> str:
    """Lower-case and strip punctuation as COCO's PTBTokenizer does before scoring."""
    text = text.lower().replace("\n", " ")
    tokens = re.findall(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]", text)
    return " ".join(t for t in tokens if t not in _PTB_PUNCT and re.search(r"[a-z0-9]", t))


def _ngrams(sentence: str, n: int = 4) -> Counter:
    words = sentence.split()
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def cider_d(candidates: list[str], references: list[list[str]], *, n: int = 4, sigma: float = 6.0,
            tokenize: bool = True) -> tuple[float, list[float]]:
    """(corpus CIDEr-D, per-candidate scores); references[i] are the references of candidates[i]."""
    if len(candidates) != len(references):
        raise ValueError("one list of references per candidate is needed")
    if not candidates:
        return 0.0, []
    prep = coco_tokenize if tokenize else (lambda s: s)
    tests = [_ngrams(prep(c), n) for c in candidates]
    refs = [[_ngrams(prep(r), n) for r in rs] for rs in references]
    df: Counter = Counter()
    for rs in refs:
        df.update({g for r in rs for g in r})
    ref_len = math.log(float(len(refs)))

    def vec(counts: Counter):
        v = [defaultdict(float) for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for g, tf in counts.items():
            k = len(g) - 1
            v[k][g] = tf * (ref_len - math.log(max(1.0, df[g])))
            norm[k] += v[k][g] ** 2
            if k == 1:  # as in pycocoevalcap: the "length" counts bigrams
                length += tf
        return v, [math.sqrt(x) for x in norm], length

    scores = []
    for test, rs in zip(tests, refs, strict=True):
        vh, nh, lh = vec(test)
        total = [0.0] * n
        for r in rs:
            vr, nr, lr = vec(r)
            delta = float(lh - lr)
            for k in range(n):
                val = sum(min(w, vr[k][g]) * vr[k][g] for g, w in vh[k].items())
                if nh[k] != 0 and nr[k] != 0:
                    val /= nh[k] * nr[k]
                total[k] += val * math.exp(-(delta**2) / (2 * sigma**2))
        scores.append(sum(total) / n / len(rs) * 10.0)
    return sum(scores) / len(scores), scores


# ----------------------------------------------------------------------------- VQA accuracy

# The official VQA evaluation's answer processing (Antol et al., VQA eval tools): its contraction
# table, number words, articles and punctuation rules, quirks included (its capitalised keys such
# as "Im" never match the lower-cased words they are looked up with, and its period regex is
# written `(?!<=\d)`), so scores agree with the official tool's.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _digits_articles(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(answer: str) -> str:
    """The official VQA evaluation's processing of an answer string."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(text))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """The official VQA accuracy: the mean, over leaving out each reference answer in turn, of
    min(1, #other references equal to the prediction / 3), after the official answer processing.

    With VQAv2's 10 answers, 3 matching references give 0.9 (not 1.0). References are processed as
    the prediction is (the official tool processes them only when they differ, since VQAv2's are
    already normalised; this makes hand-written answers such as "Red" match "red"). A task with a
    single reference is scored by exact match after processing (leaving it out would leave none).
    """
    pred = normalize_answer(prediction)
    refs = [normalize_answer(a) for a in answers]
    if len(refs) == 1:
        return float(refs[0] == pred)
    matches = [r == pred for r in refs]
    total = sum(matches)
    return sum(min(1.0, (total - m) / 3.0) for m in matches) / len(refs)
