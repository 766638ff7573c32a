"""Text that must not reach or leave the smoothing LLM: injections, links, addresses, requests for secrets.

User text (anchor words, excerpts) goes into the smoothing prompt, and the description that comes
back is stored and later put into serving prompts. Both are checked on a *folded* form of the
text, so look-alikes do not slip through: Unicode NFKC (full-width and stylised letters), format
characters removed (zero-width spaces and joiners, bidi controls), common Cyrillic and Greek
homoglyphs mapped to the Latin letters they imitate, then lowercased.
"""

from __future__ import annotations

import re
import unicodedata

# Cyrillic and Greek letters that render like Latin ones (the usual homoglyph substitutions)
_CONFUSABLE = str.maketrans({
    "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c", "т": "t",
    "у": "y", "х": "x", "і": "i", "ї": "i", "ј": "j", "ѕ": "s", "ԁ": "d", "ԛ": "q", "ԝ": "w", "ɡ": "g", "һ": "h",
    "α": "a", "β": "b", "ε": "e", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "τ": "t", "υ": "u", "χ": "x",
    "ϲ": "c", "ј": "j", "ӏ": "l", "ɩ": "i", "ℓ": "l", "ı": "i",
})


def fold(text: str) -> str:
    """NFKC, no format characters, lowercase, homoglyphs mapped to Latin."""
    return _forms(text)[1]


# "ignore the previous instructions" and its kin, in several languages (on folded text)
_INJECTION = re.compile(
    r"\b(?:ignore|disregard|forget|override|bypass)\b[\w\s,'’]{0,40}?\b(?:instruction|instructions|prompt|prompts|"
    r"rules|above|previous|prior|directions|guidelines)\b"
    r"|\b(?:system prompt|you are now|new instructions|jailbreak|developer mode|act as|pretend to be|roleplay as)\b"
    r"|(?:^|\n)\s*(?:system|assistant|user)\s*:"
    r"|\bignor(?:a|e|ez|iere|ieren|ar|are)\b[\w\s,'’]{0,40}?\b(?:instrucciones|instructions|anweisungen|istruzioni|"
    r"instrucoes|instruções|regeln|reglas|règles|consignes)\b"                     # es fr de it pt
    r"|\b(?:oublie|oubliez|vergiss|olvida|dimentica)\b[\w\s,'’]{0,40}?\b(?:instructions|anweisungen|instrucciones|"
    r"istruzioni|consignes)\b"
    r"|игнорир\w*[\w\s,]{0,40}?инструкц|забудь\w*[\w\s,]{0,40}?инструкц"          # ru
    r"|忽略.{0,12}(?:指令|指示|提示)|无视.{0,12}(?:指令|指示)|前の指示を無視|指示を無視",  # zh ja
    re.IGNORECASE)
_URL = re.compile(r"\b(?:https?|ftp)://|\bwww\.|\b[a-z0-9-]{2,}\.(?:com|org|net|io|ru|cn|xyz|info|biz|co|me|ly|"
                  r"app|dev|link|click|top|site|online)\b|\[[^\]]*\]\([^)]*\)")
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+|\b[\w.+-]+\s*(?:\(at\)|\[at\]| at )\s*[\w-]+\s*(?:\(dot\)|\[dot\]| dot )")
_SECRETS = re.compile(
    r"\b(?:password|passwort|contraseña|mot de passe|passcode|pin code|api[ _-]?key|access token|secret key|"
    r"credit card|card number|cvv|social security|ssn|bank account|seed phrase|private key|one[- ]time code|"
    r"2fa code|login details|credentials|log ?in to|sign ?in to|verify your (?:account|identity))\b"
    r"|парол|пароль|密码|口令", re.IGNORECASE)
# imperative calls to action addressed to a reader, which a style description never contains
_CALL_TO_ACTION = re.compile(
    r"\b(?:click|visit|go to|download|contact|reply to|subscribe|sign up|buy|send)\b"
    r"[\w\s,'’]{0,30}?\b(?:here|link|now|me|us|site|page|website|below|number)\b")


def _forms(text: str) -> tuple[str, str]:
    """The text normalised (NFKC, no format characters, lowercase), and that with homoglyphs mapped to Latin
    (a real Cyrillic or Greek word is matched in the first form, a disguised Latin one in the second)."""
    plain = "".join(ch for ch in unicodedata.normalize("NFKC", text) if unicodedata.category(ch) != "Cf").lower()
    return plain, plain.translate(_CONFUSABLE)


_DESCRIPTION_CHECKS = ((_INJECTION, "instruction-like text"), (_URL, "a link or web address"),
                       (_EMAIL, "an e-mail address"), (_SECRETS, "a request for credentials or secrets"),
                       (_CALL_TO_ACTION, "a call to action addressed to the reader"))


def description_problem(text: str) -> str | None:
    """Why a generated description must not be stored, or None."""
    forms = _forms(text)
    for pattern, why in _DESCRIPTION_CHECKS:
        if any(pattern.search(f) for f in forms):
            return f"{why} in the description"
    return None


def excerpt_problem(text: str) -> str | None:
    """Why a window of user text must not be quoted in the smoothing prompt, or None."""
    forms = _forms(text)
    for pattern, why in _DESCRIPTION_CHECKS[:4]:
        if any(pattern.search(f) for f in forms):
            return why
    return None


_ANCHOR_DENY = frozenset("""ignore disregard forget override bypass instruction instructions prompt prompts system
assistant jailbreak password passwords credentials token tokens http https www com org net email mail click
visit login signin""".split())
_ANCHOR_WORD = re.compile(r"^[^\W\d_]+(?:['’-][^\W\d_]+)*$", re.UNICODE)


def anchor_ok(word: str) -> bool:
    """Whether an anchor word may appear in the smoothing prompt: a plain word, no command or address fragment."""
    folded = fold(word).strip()
    return bool(_ANCHOR_WORD.match(folded)) and folded not in _ANCHOR_DENY and len(folded) <= 40
