"""PTB tokenisation as the COCO caption evaluation does it (used by the caption metrics).

Tokenisation (:func:`ptb_tokenize`): the COCO evaluation runs Stanford CoreNLP 3.4.1's
PTBTokenizer (``-preserveLines -lowerCase``) and then drops the tokens in
:data:`PTB_PUNCTUATIONS`. With ``backend='auto'`` we run exactly that -- the jar shipped with
pycocoevalcap, on UTF-8 stdin/stdout, so no temporary file goes into site-packages and the
result does not depend on the locale -- whenever ``java`` is on PATH. Only where Java is absent
does it use a pure-Python port of the 3.4.1 lexer rules (``backend='python'``): lowercasing,
quotes to `` / '', brackets to -lrb-/-rrb-/-lsb-/..., clitics (``do n't``, ``it 's``,
``can not``), abbreviations that keep their period (``mr.``, ``st.``, ``u.s.``, ``etc.``; single
letters before a capitalised function word lose it), numbers/fractions/currency, hyphenated
words, ellipses. tests/test_metrics.py checks it equals pycocoevalcap's PTBTokenizer on every
caption the tests use (ordinary text plus 600 generated captions); exotic input (URLs, e-mail,
SGML, phone numbers, rare symbols) may differ.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import subprocess
from typing import Any, Callable, List, Optional, Sequence, Tuple


# ------------------------------------------------------------------------------------------------
# PTB tokenisation (COCO caption evaluation)
# ------------------------------------------------------------------------------------------------

#: Tokens pycocoevalcap removes after PTB tokenisation. The tokenizer runs with -lowerCase, so
#: '-lrb-' etc. never equal '-LRB-' and survive: an upstream quirk we reproduce.
PTB_PUNCTUATIONS = frozenset(["''", "'", '``', '`', '-LRB-', '-RRB-', '-LCB-', '-RCB-', '.', '?',
                              '!', ',', ':', '-', '--', '...', ';'])
_JAR_NAME = 'stanford-corenlp-3.4.1.jar'


def java_available() -> bool:
  """Whether a ``java`` executable is on PATH (PTB tokenizer jar, METEOR)."""
  return shutil.which('java') is not None


def _find_ptb_jar() -> Optional[str]:
  """pycocoevalcap's CoreNLP jar, located without importing the package (it runs no code)."""
  spec = importlib.util.find_spec('pycocoevalcap')
  for loc in (spec.submodule_search_locations or []) if spec else []:
    cand = os.path.join(loc, 'tokenizer', _JAR_NAME)
    if os.path.isfile(cand):
      return cand
  return None


def _java_ptb_lines(lines: List[str], jar: str) -> List[str]:
  cmd = ['java', '-cp', jar, 'edu.stanford.nlp.process.PTBTokenizer', '-preserveLines',
         '-lowerCase', '-encoding', 'utf-8']
  proc = subprocess.run(cmd, input='\n'.join(lines).encode('utf-8'), capture_output=True,
                        check=False)
  out = proc.stdout.decode('utf-8').split('\n')
  if proc.returncode != 0 or len(out) < len(lines):
    raise RuntimeError(f'PTBTokenizer ({jar}) failed with code {proc.returncode} or returned '
                       f'{len(out)} lines for {len(lines)}: {proc.stderr.decode()[-500:]}')
  return out[:len(lines)]


# --- Pure-Python port of the PTBLexer (CoreNLP 3.4.1) rules. JFlex semantics: at each position the
# longest match wins (trailing context counts), ties go to the earlier rule. Literal words are
# caseless; bracketed letters (JFlex character classes) are case-sensitive, as in %caseless JFlex.
def _char_class(pred: Callable[[str], bool]) -> str:
  ranges, start, prev = [], None, 0
  for cp in range(0x10000):
    if pred(chr(cp)):
      start = cp if start is None else start
      prev = cp
    elif start is not None:
      ranges.append((start, prev))
      start = None
  return ''.join(re.escape(chr(a)) + (f'-{re.escape(chr(b))}' if b > a else '') for a, b in ranges)


def _ci(words: str) -> str:
  """JFlex caseless alternatives -> regex: literals caseless, ``[..]`` classes case-sensitive."""
  return '(?i:' + re.sub(r'\[[^\]]*\]', lambda m: f'(?-i:{m.group()})', words) + ')'


_LETTER = f'[{_char_class(str.isalpha)}]'  # JFlex [:letter:]; _LET adds WORD's extra marks.
_LET = f'[{_LETTER[1:-1]}\u00AD\u0237-\u024F\u02C2-\u02C5\u02D2-\u02DF\u02E5-\u02FF\u0300-\u036F]'
_ALNUM = rf'(?:{_LETTER}|\d)'
_APOS = r"(?:['\u0092\u2019]|&apos;)"
_APOSX = r"(?:['\u0092\u2019`\u0091\u2018\u201B]|&apos;)"
_SP = ' \t\u00A0\u2000-\u200A\u3000'
_SPNL = f'[{_SP}\\n]'
_SGML_NAME = r'[A-Za-z][A-Za-z0-9_:.\-]*'
_SGML = (rf'<(?:[!?][A-Za-z\-][^>\r\n]*|/{_SGML_NAME}|{_SGML_NAME}(?:[ ]+(?:{_SGML_NAME}[ ]*=[ ]*'
         rf'(?:\'[^\'\r\n]*\'|"[^"\r\n]*"|{_SGML_NAME})|{_SGML_NAME}))*[ ]*/?)[ ]*>')
_NUM = r'(?:\d*(?:[.:,\u00AD\u066B\u066C]\d+)+|\d+)'
_WORD = rf'{_LET}(?:{_LET}|\d)*(?:[.!?]{_LET}(?:{_LET}|\d)*)*'
_HYPHEN = r'[-_\u058A\u2010\u2011]'
_OPREFIX = rf'(?:[dDoOlL]{_APOSX}{_ALNUM})?'  # d'Avignon, o'clock, l'amour
_THING = rf'{_OPREFIX}{_ALNUM}+(?:{_HYPHEN}{_OPREFIX}{_ALNUM}+)*'
_ACRO_X = _ci(r'(?:canada|sino|korean|eu|japan|non)-u\.s|u\.s\.-(?:u\.s\.s\.r|u\.k)')
_ACRO = rf'(?:{_ACRO_X}|[A-Za-z](?:\.[A-Za-z])*)'
_ACRO2 = rf'(?:{_ACRO_X}|[A-Za-z](?:\.[A-Za-z])+)'
_HTHING = rf'[A-Za-z0-9][A-Za-z0-9.,\u00AD]*(?:-(?:{_ACRO2}\.|[A-Za-z0-9\u00AD]+))+'
_THINGA = r'[A-Z]+(?:(?:[+&]|&amp;)[A-Z]+)+'
_REDAUX = rf"{_APOS}(?:[msdMSD]|{_ci('re|ve|ll')})"
_ABBREV1 = _ci(  # Usually followed by lower case; before a capital they also end the sentence.
    r'Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sept?|Oct|Nov|Dec|Mon|Tues?|Wed|Thu|Thurs|Fri|Ala|Ariz|[A]z'
    r'|[A]rk|Calif|Colo|Conn|Ct|Dak|[D]el|Fla|Ga|[I]ll|Ind|Kans?|Ky|[L]a|[M]ass|Md|Mich|Minn'
    r'|[M]iss|Mo|Mont|Neb|Nev|Okla|[O]re|[P]a|Penn|Tenn|[T]ex|Va|Vt|[W]ash|Wisc?|Wyo|Inc|Cos?'
    r'|Corp|Pp?t[ye]s?|Ltd|Plc|Rt|Bancorp|Bhd|Assn|Univ|Intl|Sys|tel|est|ext|sq|Jr|Sr|Bros'
    r'|(?:Ed|Ph)\.D|Blvd|Rd|Esq|etc|al|seq|Bldg') + r'\.'
_ABBREV4 = _ci(  # Titles etc.: usually followed by a capitalised word, keep their period.
    r'Mrs?|Ms|[M]iss|Drs?|Profs?|Sens?|Reps?|Attys?|Lt|Col|Gen|Messrs|Govs?|Adm|Rev|Maj|Sgt|Cpl'
    r'|Pvt|Capt|Ste?|Ave|Pres|Lieut|Hon|Brig|Co?mdr|Pfc|Spc|Supts?|Det|Mt|Ft|Adj|Adv|Asst|Assoc'
    r'|Ens|Insp|Mlle|Mme|Msgr|Sfc|vs|[v]|Alex|Wm|Jos|Cie|a\.k\.a|cf|TREAS|Ph|Invt|Elec|Natl'
    r'|M[ft]g|Dept')
_ABBREV3 = _ci(r'ca|figs?|prop|nos?|art|bldg|pp|op') + r'\.'  # Only before a number.
_ABBREV4 = rf'(?:{_ABBREV4}|{_ACRO})'
# After "X." these capitalised words make X. sentence-final (single letters then lose the period).
_FOLLOW = '|'.join(w[0] + _ci(w[1:]) for w in (
    'About According Additionally After An A As At But Earlier He Her Here However If In It Last '
    'Many More Mr. Ms. Now Once One Other Our She Since So Some Such That The Their Then There '
    'These They This We When While What Yet You').replace('.', r'\.').split())


def _quotes(left: bool) -> Callable[[str], str]:
  def fn(tok):  # PTBLexer latexQuotes().
    tok = re.sub("&apos;|'", '`' if left else "'", tok)
    tok = re.sub('"|&quot;', '``' if left else "''", tok)
    tok = re.sub('[\u0091\u2018\u201B\u2039]', '`', tok)
    tok = re.sub('[\u0092\u2019\u203A]', "'", tok)
    tok = re.sub('[\u0093\u201C\u00AB]', '``', tok)
    return re.sub('[\u0094\u201D\u00BB]', "''", tok)
  return fn


def _soft(tok: str) -> str:  # PTBLexer removeSoftHyphens().
  return tok.replace('\u00AD', '') or '-'


def _paren(tok: str) -> str:
  return tok.replace(' ', '\u00A0').replace('(', '-LRB-').replace(')', '-RRB-')


_CURRENCY = {'\u00A2': 'cents', '\u00A3': '#', '\u0080': '$', '\u00A4': '$', '\u20A0': '$',
             '\u20AC': '$'}
_FRACS = {'\u00BC': '1/4', '\u00BD': '1/2', '\u00BE': '3/4', '\u2153': '1/3', '\u2154': '2/3'}
_BRACKETS = {'(': '-LRB-', ')': '-RRB-', '[': '-LSB-', ']': '-RSB-', '{': '-LCB-', '}': '-RCB-',
             '&lt;': '<', '&gt;': '>'}
# Actions: None keeps the text; a str is the token; callables map the text; ('push', k) drops k
# chars for re-lexing; 'dup' emits the text and re-lexes its final period; 'skip' emits nothing.
_RULE_SPECS: List[Tuple[str, str, Optional[str], Any]] = [
    ('L', _ci(r'c\+\+|(?:c|f)#'), None, None),
    ('LO', _ci(rf'cannot|{_APOS}twas'), None, ('push', 3)),
    ('LO', _ci(rf'{_APOS}tis|gonna|gotta|lemme|gimme|wanna'), None, ('push', 2)),
    ('O', _SGML, None, lambda t: t.replace(' ', '\u00A0')),
    ('O', r'&(?:MD|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015]', None, '--'),
    ('O', '&amp;', None, '&'),
    ('O', r'&(?:HT|TL|UR|LR|QC|QL|QR|odq|cdq|#[0-9]+);', None, None),
    ('L', _WORD, _REDAUX, _soft),
    ('L', r'[A-Za-z\u00AD]*[A-MO-Za-mo-z]\u00AD*', rf'[nN]{_APOSX}[tT]', _soft),
    ('L', _WORD, None, _soft),
    ('LO', rf'{_APOS}[nN]{_APOS}?', None, None),
    ('L', rf'[lLdDjJ]{_APOS}|{_ci("dunkin|somethin|ol")}{_APOS}', None, None),
    ('O', rf'{_APOS}(?:{_ci("em|till?|cause")}|[2-9]0[sS])', None, None),
    ('L', rf'[A-HJ-XZn]{_APOSX}{_LETTER}{{2}}{_LETTER}*', None, None),
    ('L', rf'{_LETTER}+[aeiouyAEIOUY]{_APOSX}[aeiouA-Z]{_LETTER}*', None, None),
    ('LO', _ci(r"cont'd\.?|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l"), None, None),
    ('L', rf'[yY]{_APOS}', _LETTER, None),
    ('L', r'(?i:https?)://[^ \t\n\f\r"<>|()]+[^ \t\n\f\r"<>|.!?(){},-]', None, None),
    ('LDO', r'(?:www\.(?:[^ \t\n\f\r"<>|.!?(){},]+\.)+[a-zA-Z]{2,4}|'
     r'(?:[^ \t\n\f\r"`\'<>|.!?(){},-_$]+\.)+(?i:com|net|org|edu))'
     r'(?:/[^ \t\n\f\r"<>|()]+[^ \t\n\f\r"<>|.!?(){},-])?', None, None),
    ('LDO', r'(?:&lt;|<)?[a-zA-Z0-9][^ \t\n\f\r"<>|(){}\u00A0]*@'
     r'(?:[^ \t\n\f\r"<>|(){}.\u00A0]+\.)*[^ \t\n\f\r"<>|(){}.\u00A0]+(?:&gt;|>)?', None, None),
    ('O', rf'@[a-zA-Z_][a-zA-Z_0-9]*|#{_LET}+', None, None),
    ('O', _REDAUX, r'[^A-Za-z]', _quotes(False)),
    ('L', rf'[nN]{_APOSX}[tT]', None, _quotes(False)),
    ('D', r'\d{1,2}[\-/]\d{1,2}[\-/]\d{2,4}', None, None),
    ('DO', rf'[\-+]?{_NUM}', None, _soft),
    ('O', r'[\u207A\u207B\u208A\u208B]?(?:[\u2070\u00B9\u00B2\u00B3\u2074-\u2079]+|'
     r'[\u2080-\u2089]+)', None, None),
    ('D', r'(?:\d{1,4}[- \u00A0])?\d{1,4}(?:\\?/|\u2044)\d{1,4}', None,
     lambda t: t.replace(' ', '\u00A0')),
    ('O', r'[\u00BC\u00BD\u00BE\u2153-\u215E]', None, lambda t: _FRACS.get(t, t)),
    ('LO', r'-(?i:RRB|LRB|RCB|LCB|RSB|LSB)-|' + _ci(rf'C\.D\.s|pro-|anti-|S(?:&|&amp;)P-500|'
                                                     rf'S(?:&|&amp;)Ls|Cap{_APOS}n|c{_APOS}est'),
     None, lambda t: t.replace('&amp;', '&')),
    ('LD', r'[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}', None,
     None),
    ('LO', r'[A-Z]*\$|#', None, None),
    ('O', r'[\u00A2\u00A3\u00A4\u00A5\u0080\u20A0\u20AA\u20AC\u20B9\u060B\u0E3F\u20A4\uFFE0\uFFE1'
     r'\uFFE5\uFFE6]', None, lambda t: _CURRENCY.get(t, t)),
    ('L', rf'{_ACRO}\.', rf'{_SPNL}+(?:{_FOLLOW}|{_SGML}){_SPNL}', 'acronym'),
    ('L', _ABBREV3, rf'{_SPNL}?\d', None),
    ('L', _ci(r'pt[ey]|co') + r'\.', f'[{_SP}]' + _ci('ltd|lim'), None),
    ('L', _ABBREV1, rf'{_SPNL}(?:{_SPNL}|[{_char_class(str.isupper)}]|{_SGML})', 'dup'),
    ('L', _ABBREV1, r'[\s\S]{2}', None),  # JFlex hack: beats WORD, as in "etc.a".
    ('L', _ABBREV1, None, 'dup'),
    ('L', rf'{_ABBREV4}\.', None, None),
    ('L', _ABBREV4, f'[{_SP}]', None),
    ('L', _ACRO, _SPNL, None),
    ('O', rf'{_APOS}\d\d', _SPNL, None),
    ('LD', rf'{_ALNUM}+\.' + _ci(
        'bat|bmp|bz2|c|class|cgi|cpp|dll|doc|docx|exe|gif|gz|h|htm|html|jar|java|jpeg|jpg|mov|mp3|'
        'pdf|php|pl|png|ppt|ps|py|sql|tar|txt|wav|x|xml|zip|3gp|wm[va]|avi|flv|mov|mp[34g]'),
     rf'{_SPNL}|[.?!,"\'<]', None),
    ('L', rf'{_WORD}\.', r'[,;:\u3001]', _soft),
    ('DO', r'(?:\([0-9]{2,3}\)[ \u00A0]?|(?:\+\+?)?(?:[0-9]{2,4}[\- \u00A0])?[0-9]{2,4}[\- \u00A0])'
     r'[0-9]{3,4}[\- \u00A0]?[0-9]{3,5}', None, _paren),
    ('DO', r'(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5}', None, None),
    ('O', r'"|&quot;', r'[A-Za-z0-9$]', '``'),
    ('O', r'"|&quot;', None, "''"),
    ('O', '\x7f', None, 'skip'),
    ('O', r'[<>]?[:;=][\-o*\']?[()DPdpO\\{@|\[\]]', r'[^A-Za-z0-9]', _paren),
    ('LO', r"[\-^x=~<>']_[\-^x=~<>']|\([\-^x=~<>'][_.]?[\-^x=~<>']\)|\([\^x=~<>']-[\^x=~<>'`]\)",
     None, _paren),
    ('O', r'[()\[\]{}]|&lt;|&gt;|<|>', None, lambda t: _BRACKETS.get(t, t)),
    ('O', r'-+', None, lambda t: '--' if 3 <= len(t) <= 4 else t),
    ('O', r'\.{3,5}|(?:\.[ \u00A0]){2,4}\.|[\u0085\u2026]', None, '...'),
    ('O', r'@+|#+|_+|\*+|(?:\\\*){1,3}|[,;:\u3001]|[?!]+|=|/', None, None),
    ('O', '[.\u00A1\u00BF\u037E\u0589\u061F\u06D4\u0700-\u0702\u07FA\u3002]', None, None),
    ('LD', _HTHING + r'\.', r'[,;:\u3001]', _soft),
    ('LD', _HTHING, None, _soft),
    ('LD', _THING + r'\.', r'[,;:\u3001]', None),
    ('LD', _THING, None, None),
    ('L', _THINGA + r'\.', r'[,;:\u3001]', lambda t: t.replace('&amp;', '&')),
    ('L', _THINGA, None, lambda t: t.replace('&amp;', '&')),
    ('O', "'", r"[A-Za-z][^ \t\n\r\u00A0]", '`'),
    ('O', _REDAUX, None, _quotes(False)),
    ('O', r"''|[`\u2018\u2019\u201A\u201B\u201C\u201D\u0091-\u0094\u201E\u201F\u2039\u203A"
     rf"\u00AB\u00BB]{{1,2}}|{_APOS}", None, _quotes(False)),
    ('O', r'<<|>>', None, None),
    ('O', '[+%&~^|\\\\\u00A6\u00A7\u00A8\u00A9\u00AC\u00AE\u00AF\u00B0-\u00BA\u00D7\u00F7\u0387'
     '\u2016\u2017\u2020-\u2023\u2030-\u2038\u203B\u203E-\u2042\u2044\u207A-\u207F\u208A-\u208E'
     '\u2100-\u214F\u2190-\u21FF\u2200-\u2BFF\u3012\u30FB\uFF01-\uFF0F\uFF1A-\uFF20\uFF3B-\uFF40'
     '\uFF5B-\uFF65]', None, None),
    ('O', '&nbsp;', None, 'skip'),
]
_RULES = {c: [(re.compile(f'(?P<t>{main})' + (f'(?:{ctx})' if ctx else '')), act)
              for cats, main, ctx, act in _RULE_SPECS if c in cats] for c in 'LDO'}
_LET_RE = re.compile(_LET)
# Fast paths for the bulk of caption text, where the full rule set provably gives the same token:
# a plain word before a space or before ,;:!? + space; such a punctuation mark; a word before a
# sentence period (unless it may be an abbreviation); that period (unless it may start '. . .').
_END = r'(?=[ \t\n]|\Z)'
_PERIOD_END = r'(?=\.(?:\n|\Z|[ \t\u00A0](?!\.)))'
_FAST = re.compile(rf'[A-Za-z]+{_END}|[A-Za-z]+(?=[,;:!?]{_END})|[,;:]{_END}|'
                   rf'(?P<w>[A-Za-z]{{2,}}){_PERIOD_END}|\.(?=\n|\Z|[ \t\u00A0](?!\.))')
_FAST_EXCLUDE = frozenset(['cannot', 'gonna', 'gotta', 'lemme', 'gimme', 'wanna'])
_MAYBE_ABBREV = re.compile(rf'(?:{_ABBREV1}|{_ABBREV4}\.|{_ABBREV3}|' + _ci('pt[ey]|co') + r'\.)$')
_SKIP = frozenset(' \t\u00A0\u3000\x00\u200B\u200E\u200F\uFEFF' + ''.join(map(chr, range(0x2000,
                                                                                      0x200B))))


def _python_ptb_lines(lines: List[str]) -> List[str]:
  """Lexes the newline-joined captions like PTBTokenizer -preserveLines -lowerCase."""
  text = '\n'.join(lines)
  out: List[List[str]] = [[]]
  pos, end = 0, len(text)
  while pos < end:
    ch = text[pos]
    if ch == '\n':
      out.append([])
      pos += 1
      continue
    if ch in _SKIP:
      pos += 1
      continue
    fast = _FAST.match(text, pos)
    if fast and fast.group().lower() not in _FAST_EXCLUDE and not (
        fast.group('w') and _MAYBE_ABBREV.match(fast.group() + '.')):
      out[-1].append(fast.group().lower())
      pos = fast.end()
      continue
    cat = 'L' if _LET_RE.match(ch) else ('D' if ch.isdecimal() else 'O')
    best, best_len = None, 0
    for regex, action in _RULES[cat]:
      m = regex.match(text, pos)
      if m is not None and m.end() - pos > best_len:
        best, best_len = (m.group('t'), action), m.end() - pos
    if best is None:  # Untokenizable character: PTBTokenizer deletes it.
      pos += 1
      continue
    tok, action = best
    step = len(tok)
    if isinstance(action, tuple):  # ('push', k): emit the head, re-lex the last k chars.
      step -= action[1]
      tok = tok[:step]
    elif action == 'acronym':  # "I. The" -> "i" "."; "U.S. The" -> "u.s." "." (period re-lexed).
      step -= 1
      tok = tok[:-1] if len(tok) == 2 else tok
    elif action == 'dup':
      step -= 1
    elif action == 'skip':
      tok = None
    elif isinstance(action, str):
      tok = action
    elif action is not None:
      tok = action(tok)
    if tok is not None:
      out[-1].append(tok.lower())
    pos += step
  return [' '.join(toks) for toks in out]


def ptb_tokenize(captions: Sequence[str], backend: str = 'auto') -> List[str]:
  """COCO-eval tokenisation of ``captions``: PTB tokens, lowercased, punctuation tokens removed.

  Args:
    captions: raw caption strings (tokenised together, as pycocoevalcap does per call).
    backend: 'java' (pycocoevalcap's Stanford PTBTokenizer jar, exact), 'python' (pure-Python
      port, for machines without Java), or 'auto' (java whenever ``java`` and the jar are there).
  Returns:
    One space-joined token string per caption.
  """
  if backend not in ('auto', 'java', 'python'):
    raise ValueError(f"backend must be 'auto', 'java' or 'python', got {backend!r}")
  for i, c in enumerate(captions):
    if not isinstance(c, str):
      raise TypeError(f'caption {i} is {type(c).__name__}, expected str: {c!r}')
  # One caption per line: line breaks inside a caption would shift every later caption.
  lines = [re.sub('[\n\r\u2028\u2029\x0b\x0c]', ' ', c) for c in captions]
  if not lines:
    return []
  jar = _find_ptb_jar() if backend != 'python' else None
  if backend == 'java' and (jar is None or not java_available()):
    raise RuntimeError(f'backend="java" needs `java` on PATH (apt-get install '
                       f'default-jre-headless) and {_JAR_NAME} (pip install pycocoevalcap==1.2)')
  if jar is not None and java_available():
    raw = _java_ptb_lines(lines, jar)
  else:
    if backend == 'auto':
      logging.info('PTB tokenisation: Java/CoreNLP not found, using the pure-Python port.')
    raw = _python_ptb_lines(lines)
  return [' '.join(w for w in line.rstrip().split(' ') if w not in PTB_PUNCTUATIONS)
          for line in raw]
