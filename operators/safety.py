"""Text that must not reach or leave the smoothing LLM: injections, links, addresses, requests for secrets.

User text (anchor words, excerpts) goes into the smoothing prompt, and the description that comes
back is stored and later put into serving prompts. Both are checked in two forms, so look-alikes
do not slip through:

- *plain*: Unicode NFKC (full-width and stylised letters), format characters removed (zero-width
  spaces and joiners, bidi controls), lowercased;
- *folded*: NFKD with every combining mark, variation selector and invisible filler removed
  (accents, overlays such as U+0336, the dot of a dotted capital I), common Cyrillic, Greek and
  small-capital homoglyphs mapped to the Latin letters they imitate, ideographic full stops and
  at-signs mapped to ASCII.

The checks aim at what a style description never needs: an instruction to a model, a link or
domain with a path, an e-mail address, a request for a secret, or an imperative call to action.
"""

from __future__ import annotations

import re
import unicodedata

# Cyrillic, Greek and small-capital letters that render like Latin ones
_CONFUSABLE = str.maketrans({
    "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c", "т": "t",
    "у": "y", "х": "x", "і": "i", "ї": "i", "ј": "j", "ѕ": "s", "ԁ": "d", "ԛ": "q", "ԝ": "w", "ɡ": "g", "һ": "h",
    "α": "a", "β": "b", "ε": "e", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "τ": "t", "υ": "u", "χ": "x",
    "ϲ": "c", "ӏ": "l", "ɩ": "i", "ℓ": "l", "ı": "i",
    "ᴀ": "a", "ʙ": "b", "ᴄ": "c", "ᴅ": "d", "ᴇ": "e", "ꜰ": "f", "ɢ": "g", "ʜ": "h", "ɪ": "i", "ᴊ": "j", "ᴋ": "k",
    "ʟ": "l", "ᴍ": "m", "ɴ": "n", "ᴏ": "o", "ᴘ": "p", "ʀ": "r", "ꜱ": "s", "ᴛ": "t", "ᴜ": "u", "ᴠ": "v", "ᴡ": "w",
    "ʏ": "y", "ᴢ": "z", "。": ".", "｡": ".", "＠": "@", "﹫": "@",
})
_INVISIBLE = {"\u3164", "\u115f", "\u1160", "\uffa0", "\u2800", "\u034f"}


def _forms(text: str) -> tuple[str, str]:
    """(plain, folded): see the module's docstring."""
    plain = "".join(ch for ch in unicodedata.normalize("NFKC", text) if unicodedata.category(ch) != "Cf").lower()
    decomposed = unicodedata.normalize("NFKD", text)
    kept = "".join(ch for ch in decomposed
                   if unicodedata.category(ch) not in ("Mn", "Me", "Cf") and ch not in _INVISIBLE)
    return plain, unicodedata.normalize("NFKC", kept).lower().translate(_CONFUSABLE)


def fold(text: str) -> str:
    return _forms(text)[1]


_PREVIOUS = (r"(?:all|any|the|your|these|those|my|previous|prior|above|earlier|preceding|original|system)"
             r"(?:\s+(?:previous|prior|above|earlier|preceding|original|system))?")
_ORDERS = r"(?:instructions?|prompts?|directions|directives|guidelines|messages|commands|rules)"
# an instruction to the model reading the text, in several languages (on both forms)
_INJECTION = re.compile(
    rf"\b(?:ignore|disregard|forget|override|bypass|skip)\s+{_PREVIOUS}\s+{_ORDERS}\b"
    r"|\b(?:system prompt|you are now|new instructions|jailbreak|do anything now|no longer bound)\b"
    r"|\b(?:reply|respond|answer|output|say)\s+only\s+(?:with|in)\b"
    r"|(?:^|\n)\s*(?:system|assistant|user)\s*:"
    r"|\bignor(?:a|e|ez|iere|ieren|ar|are)\b[\w\s,'’]{0,40}?\b(?:instrucciones|instructions|anweisungen|istruzioni|"
    r"instrucoes|instruções|consignes)\b"                                            # es fr de it pt
    r"|\b(?:oublie|oubliez|vergiss|olvida|dimentica)\b[\w\s,'’]{0,40}?\b(?:instructions|anweisungen|instrucciones|"
    r"istruzioni|consignes)\b"
    r"|игнорир\w*[\w\s,]{0,40}?инструкц|забуд\w*[\w\s,]{0,40}?инструкц"                # ru
    r"|忽略.{0,12}(?:指令|指示|提示)|无视.{0,12}(?:指令|指示)|指示を無視",                 # zh ja
    re.IGNORECASE)
_URL = re.compile(r"\b(?:https?|ftp)://|\bwww\.|\b[a-z0-9][a-z0-9-]*(?:\.[a-z0-9-]+)*\.[a-z]{2,12}/[\w/?=&%.-]"
                  r"|\b[a-z0-9][a-z0-9-]+\.(?:com|org|ru|cn|xyz|info|biz|me|ly|app|link|click|top|site|online|gg|ai|"
                  r"cc|tk|su|pw|shop|live|page)\b"   # bare domains (not .io/.net/.js: framework names)
                  r"|\[[^\]]*\]\([^)]*\)")
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+|\b[\w.+-]+\s*(?:\(at\)|\[at\])\s*[\w-]+\s*(?:\(dot\)|\[dot\]|\.)")
_SECRET = (r"(?:password|passwort|contrasena|contraseña|mot de passe|passcode|pin|api[ _-]?key|access token|"
           r"secret key|credit card (?:number|details)|card number|cvv|social security number|ssn|bank details|"
           r"seed phrase|private key|one[- ]time code|2fa code|verification code|login details|credentials|"
           r"пароль|密码)")
# a request for a secret: a verb of giving right before it (a description may mention passwords as a topic)
_SECRETS = re.compile(rf"\b(?:send|share|give|provide|enter|type|reply with|confirm|tell|email|dm|post|"
                      rf"paste|submit|verify)\b[\w\s,'’]{{0,25}}?\b{_SECRET}", re.IGNORECASE)
# an imperative call to action opening a sentence ("This person ..." descriptions never do)
_CALL_TO_ACTION = re.compile(
    r"(?:^|[.!?:;]\s+|\n|\bplease\s+)(?:click|visit|go to|download|contact|reply to|subscribe|sign up|buy|send|"
    r"call|text|dm|follow)\b")


_CHECKS = ((_INJECTION, "instruction-like text"), (_URL, "a link or web address"),
           (_EMAIL, "an e-mail address"), (_SECRETS, "a request for credentials or secrets"),
           (_CALL_TO_ACTION, "a call to action addressed to the reader"))


def description_problem(text: str) -> str | None:
    """Why a generated description must not be stored, or None."""
    forms = _forms(text)
    for pattern, why in _CHECKS:
        if any(pattern.search(f) for f in forms):
            return f"{why} in the description"
    return None


def excerpt_problem(text: str) -> str | None:
    """Why a window of user text must not be quoted in the smoothing prompt, or None."""
    forms = _forms(text)
    for pattern, why in _CHECKS[:4]:
        if any(pattern.search(f) for f in forms):
            return why
    return None


_ANCHOR_DENY = frozenset("""ignore disregard forget override bypass instruction instructions prompt prompts system
assistant jailbreak password passwords credentials token tokens http https www com org net email mail click
visit login signin""".split())
_ANCHOR_WORD = re.compile(r"^[^\W\d_]+(?:['’-][^\W\d_]+)*$", re.UNICODE)


def anchor_ok(word: str) -> bool:
    """Whether an anchor word may appear in the smoothing prompt: a plain word, no command or address fragment."""
    plain, folded = _forms(word)
    return bool(_ANCHOR_WORD.match(plain.strip())) and not {plain.strip(), folded.strip()} & _ANCHOR_DENY \
        and len(plain) <= 40
