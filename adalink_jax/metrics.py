"""Evaluation metrics that reproduce the official scorers to the last decimal (0-100 scale).

* Captioning (COCO caption evaluation, pycocoevalcap): :func:`cider` (CIDEr-D), :func:`bleu4`
  (BLEU-4, 'closest' reference length), :func:`rouge_l` (ROUGE-L, beta 1.2), on PTB-tokenised text.
* VQA (official ``vqaEval.py``; VQAv2, OK-VQA, TextVQA): :func:`vqa_accuracy`.
* ST-VQA / DocVQA: :func:`anls`.
* GLUE, as T5 computes it: :func:`accuracy`, :func:`f1_score_with_invalid`,
  :func:`matthews_corrcoef`, :func:`pearson_corrcoef`, :func:`spearman_corrcoef`,
  :func:`glue_average`, plus T5's postprocessors :func:`string_to_float` and
  :func:`string_label_to_class_id`.

Every ``seqio_*`` function has seqio's metric signature ``fn(targets, predictions) -> dict``.
Pure Python/NumPy: no TensorFlow, no pycocoevalcap import (it is only a test-time reference).

Tokenisation (:func:`ptb_tokenize`): the COCO evaluation runs Stanford CoreNLP 3.4.1's
PTBTokenizer (``-preserveLines -lowerCase``) and then drops the tokens in
:data:`PTB_PUNCTUATIONS`. With ``backend='auto'`` we run exactly that when ``java`` is on PATH and
the jar is found (pycocoevalcap's copy, located without importing it, or ``$ADALINK_PTB_JAR``);
otherwise a pure-Python port of the 3.4.1 lexer rules (``backend='python'``): lowercasing, quotes
to `` / '', brackets to -lrb-/-rrb-/-lsb-/..., clitics (``do n't``, ``it 's``, ``can not``),
abbreviations that keep their period (``mr.``, ``st.``, ``u.s.``, ``etc.``; single letters before a
capitalised function word lose it), numbers/fractions/currency, hyphenated words, ellipses. It is
tested to give the Java output on ordinary text; exotic input (URLs, e-mail, SGML, phone numbers,
rare symbols) may differ.
"""
from __future__ import annotations

import collections
import importlib.util
import logging
import math
import os
import re
import shutil
import subprocess
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

# ------------------------------------------------------------------------------------------------
# PTB tokenisation (COCO caption evaluation)
# ------------------------------------------------------------------------------------------------

#: Tokens pycocoevalcap removes after PTB tokenisation. The tokenizer runs with -lowerCase, so
#: '-lrb-' etc. never equal '-LRB-' and survive: an upstream quirk we reproduce.
PTB_PUNCTUATIONS = frozenset(["''", "'", '``', '`', '-LRB-', '-RRB-', '-LCB-', '-RCB-', '.', '?',
                              '!', ',', ':', '-', '--', '...', ';'])
_JAR_NAME = 'stanford-corenlp-3.4.1.jar'


def _find_ptb_jar() -> Optional[str]:
  path = os.environ.get('ADALINK_PTB_JAR')
  if path:
    return path if os.path.isfile(path) else None
  spec = importlib.util.find_spec('pycocoevalcap')  # Locates the package; runs none of its code.
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
    ('O', "'", rf"[A-Za-z][^ \t\n\r\u00A0]", '`'),
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
    backend: 'java' (Stanford PTBTokenizer, exact), 'python' (pure-Python port), or 'auto'
      (java when ``java`` and the CoreNLP jar are available, else python).
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
  if backend == 'java' and (jar is None or shutil.which('java') is None):
    raise RuntimeError(f'backend="java" needs `java` on PATH and {_JAR_NAME} (pip install '
                       'pycocoevalcap, or set $ADALINK_PTB_JAR)')
  if jar is not None and shutil.which('java') is not None:
    raw = _java_ptb_lines(lines, jar)
  else:
    if backend == 'auto':
      logging.info('PTB tokenisation: Java/CoreNLP not found, using the pure-Python port.')
    raw = _python_ptb_lines(lines)
  return [' '.join(w for w in line.rstrip().split(' ') if w not in PTB_PUNCTUATIONS)
          for line in raw]


# ------------------------------------------------------------------------------------------------
# CIDEr-D, BLEU-4, ROUGE-L (pycocoevalcap)
# ------------------------------------------------------------------------------------------------


def _prepare_captions(predictions: Sequence[str], references: Sequence[Sequence[str]],
                      tokenizer: Optional[str]) -> Tuple[List[List[str]], List[List[List[str]]]]:
  """Validates; PTB-tokenises refs and predictions (one call each, as COCOEvalCap); splits."""
  if len(predictions) != len(references):
    raise ValueError(f'{len(predictions)} predictions but {len(references)} reference lists')
  if not predictions:
    raise ValueError('no captions to score')
  for i, refs in enumerate(references):
    if isinstance(refs, str) or not refs:
      raise ValueError(f'references[{i}] must be a non-empty list of strings, got {refs!r}')
  flat = [r for refs in references for r in refs]
  preds = list(predictions)
  if tokenizer is not None:
    flat, preds = ptb_tokenize(flat, tokenizer), ptb_tokenize(preds, tokenizer)
  out_refs, k = [], 0
  for refs in references:
    out_refs.append([r.split(' ') for r in flat[k:k + len(refs)]])  # ROUGE splits on ' '.
    k += len(refs)
  return [p.split(' ') for p in preds], out_refs


def _ngrams(words: List[str], n: int = 4) -> Dict[Tuple[str, ...], int]:
  counts: Dict[Tuple[str, ...], int] = collections.defaultdict(int)
  for k in range(1, n + 1):
    for i in range(len(words) - k + 1):
      counts[tuple(words[i:i + k])] += 1
  return counts


def _cider_d(hyps, refs, n=4, sigma=6.0) -> np.ndarray:
  """Per-image CIDEr-D on pycocoevalcap's scale (x10), same float operations as CiderScorer."""
  # pycocoevalcap splits on any whitespace here (str.split()), unlike ROUGE's split(' ').
  ctest = [_ngrams(' '.join(h).split(), n) for h in hyps]
  crefs = [[_ngrams(' '.join(r).split(), n) for r in rs] for rs in refs]
  doc_freq: Dict[Tuple[str, ...], float] = collections.defaultdict(float)
  for rs in crefs:  # Document = an image's reference set.
    for ngram in set(g for r in rs for g in r):
      doc_freq[ngram] += 1
  log_num_docs = np.log(float(len(crefs)))
  idf: Dict[Tuple[str, ...], float] = {}

  def to_vec(counts):
    vec = [{} for _ in range(n)]
    norm = [0.0] * n
    length = 0
    for ngram, tf in counts.items():
      k = len(ngram) - 1
      if ngram not in idf:  # Unseen n-grams get df 1 (log 0 avoided), as upstream.
        idf[ngram] = float(log_num_docs - np.log(max(1.0, doc_freq.get(ngram, 0.0))))
      vec[k][ngram] = w = float(tf) * idf[ngram]
      norm[k] += w ** 2
      if k == 1:  # Upstream counts bigrams (len - 1); harmless, an empty side scores 0 anyway.
        length += tf
    return vec, [math.sqrt(x) for x in norm], length

  scores = []
  for test, rs in zip(ctest, crefs):
    vec, norm, length = to_vec(test)
    score = [0.0] * n
    for ref in rs:
      vec_r, norm_r, length_r = to_vec(ref)
      penalty = math.e ** (-(float(length - length_r) ** 2) / (2 * sigma ** 2))  # Length penalty.
      for k in range(n):
        val = 0.0
        for ngram, w in vec[k].items():  # Clipped ("-D") dot product.
          w_r = vec_r[k].get(ngram, 0.0)
          val += min(w, w_r) * w_r
        if norm[k] != 0 and norm_r[k] != 0:
          val /= norm[k] * norm_r[k]
        score[k] += val * penalty
    scores.append(np.mean(np.array(score)) / len(rs) * 10.0)
  return np.array(scores)


def _bleu(hyps, refs, n=4) -> Tuple[List[float], List[List[float]]]:
  """pycocoevalcap BleuScorer(option='closest'): corpus BLEU-1..n and per-image lists."""
  tiny, small = 1e-15, 1e-9  # Upstream's smoothing constants.
  total_guess, total_correct = [0] * n, [0] * n
  total_test, total_ref = 0, 0
  per_image: List[List[float]] = [[] for _ in range(n)]
  for hyp, rs in zip(hyps, refs):
    hyp = ' '.join(hyp).split()
    ref_lens, max_counts = [], {}
    for r in rs:
      r = ' '.join(r).split()
      ref_lens.append(len(r))
      for ngram, c in _ngrams(r, n).items():
        max_counts[ngram] = max(max_counts.get(ngram, 0), c)
    test_len = len(hyp)
    ref_len = min((abs(l - test_len), l) for l in ref_lens)[1]  # Closest; ties -> shorter.
    guess = [max(0, test_len - k + 1) for k in range(1, n + 1)]
    correct = [0] * n
    for ngram, c in _ngrams(hyp, n).items():
      correct[len(ngram) - 1] += min(max_counts.get(ngram, 0), c)
    total_test += test_len
    total_ref += ref_len
    bleu = 1.0
    for k in range(n):
      total_guess[k] += guess[k]
      total_correct[k] += correct[k]
      bleu *= (float(correct[k]) + tiny) / (float(guess[k]) + small)
      per_image[k].append(bleu ** (1.0 / (k + 1)))
    ratio = (test_len + tiny) / (ref_len + small)
    if ratio < 1:
      for k in range(n):
        per_image[k][-1] *= math.exp(1 - 1 / ratio)
  corpus, bleu = [], 1.0
  for k in range(n):
    bleu *= float(total_correct[k] + tiny) / (total_guess[k] + small)
    corpus.append(bleu ** (1.0 / (k + 1)))
  ratio = (total_test + tiny) / (total_ref + small)
  if ratio < 1:
    corpus = [b * math.exp(1 - 1 / ratio) for b in corpus]
  return corpus, per_image


def _lcs(a: List[str], b: List[str]) -> int:
  prev = [0] * (len(b) + 1)
  for x in a:
    cur = [0]
    for j, y in enumerate(b):
      cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
    prev = cur
  return prev[-1]


def _rouge_l(hyps, refs, beta=1.2) -> np.ndarray:
  """pycocoevalcap Rouge: F-beta of the max precision and max recall over references."""
  scores = []
  for hyp, rs in zip(hyps, refs):
    lcs = [_lcs(r, hyp) for r in rs]
    prec = max(l / float(len(hyp)) for l in lcs)
    rec = max(l / float(len(r)) for l, r in zip(lcs, rs))
    scores.append(((1 + beta ** 2) * prec * rec) / float(rec + beta ** 2 * prec)
                  if prec != 0 and rec != 0 else 0.0)
  return np.array(scores)


def caption_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]],
                    tokenizer: Optional[str] = 'auto') -> Dict[str, float]:
  """CIDEr(-D), BLEU-1..4 and ROUGE-L (0-100) as the COCO caption evaluation reports them.

  Args:
    predictions: one caption per image.
    references: a non-empty list of reference captions per image.
    tokenizer: PTB backend for :func:`ptb_tokenize` ('auto', 'java', 'python'), or None when the
      inputs are already tokenised (space-separated tokens).
  """
  hyps, refs = _prepare_captions(predictions, references, tokenizer)
  bleus, _ = _bleu(hyps, refs)
  out = {'cider': 100 * float(np.mean(_cider_d(hyps, refs))),
         'rouge_l': 100 * float(np.mean(_rouge_l(hyps, refs)))}
  out.update({f'bleu{k + 1}': 100 * b for k, b in enumerate(bleus)})
  return out


def cider(predictions, references, tokenizer='auto', return_per_example=False):
  """CIDEr-D x 100 (pycocoevalcap Cider: n=4, sigma=6, corpus document frequencies).

  With ``return_per_example`` also returns the per-image scores (same scale) as an array.
  """
  raw = _cider_d(*_prepare_captions(predictions, references, tokenizer))
  return (100 * float(np.mean(raw)), 100 * raw) if return_per_example else 100 * float(np.mean(raw))


def bleu4(predictions, references, tokenizer='auto', return_per_example=False):
  """Corpus BLEU-4 x 100 (pycocoevalcap Bleu(4), 'closest' reference length)."""
  corpus, per = _bleu(*_prepare_captions(predictions, references, tokenizer))
  return (100 * corpus[3], 100 * np.array(per[3])) if return_per_example else 100 * corpus[3]


def rouge_l(predictions, references, tokenizer='auto', return_per_example=False):
  """ROUGE-L x 100 (pycocoevalcap Rouge, beta=1.2), mean over images."""
  raw = _rouge_l(*_prepare_captions(predictions, references, tokenizer))
  return (100 * float(np.mean(raw)), 100 * raw) if return_per_example else 100 * float(np.mean(raw))


# ------------------------------------------------------------------------------------------------
# VQA accuracy (official vqaEval.py: VQAv2, OK-VQA, TextVQA)
# ------------------------------------------------------------------------------------------------

# Contractions: every form with exactly one apostrophe dropped maps to the full form (so
# "dont"/"don't", "youd've"/"you'dve" -> ...). Mixed-case keys are kept although inputs are
# lowercased first, as upstream. Plus upstream's three irregular entries.
_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've "
    "hasn't haven't he'd he'd've he's how'd how'll how's I'd've I'm I've isn't it'd it'd've it'll "
    "ma'am mightn't mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at "
    "shan't she'd've should've shouldn't shouldn't've somebody'd've somebody'll somebody's "
    "someone'd someone'd've someone'll someone's something'd something'd've something'll that's "
    "there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't "
    "we'd've we've weren't what'll what're what's what've when's where'd where's where've who'd "
    "who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all "
    "y'all'll y'all'd've you'd you'd've you'll you're you've").split()
VQA_CONTRACTIONS = {w[:i] + w[i + 1:]: w for w in _CONTRACTED for i, c in enumerate(w) if c == "'"}
VQA_CONTRACTIONS.update({"let's": "let's", "she's": "she's", "somebody'd": 'somebodyd'})
VQA_NUMBERS = {w: str(i) for i, w in enumerate(
    'zero one two three four five six seven eight nine ten'.split())}
VQA_NUMBERS['none'] = '0'
_VQA_ARTICLES = frozenset(['a', 'an', 'the'])
_VQA_PUNCT = [';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@',
              '`', ',', '?', '!']
_VQA_COMMA_DIGITS = re.compile(r'(\d)(,)(\d)')
# Upstream's pattern, lookbehind typo included: it strips any '.' not followed by a digit.
_VQA_PERIOD = re.compile(r'(?!<=\d)(\.)(?!\d)')


def vqa_process_punctuation(text: str) -> str:
  """vqaEval.processPunctuation: each mark is deleted if it touches a space (or the text has a
  digit,digit comma), else replaced by a space; then periods not followed by a digit go."""
  out = text
  strip_all = _VQA_COMMA_DIGITS.search(text) is not None
  for p in _VQA_PUNCT:
    out = out.replace(p, '' if (strip_all or p + ' ' in text or ' ' + p in text) else ' ')
  return _VQA_PERIOD.sub('', out, count=32)  # Upstream passes re.UNICODE (=32) as `count`.


def vqa_process_digit_article(text: str) -> str:
  """vqaEval.processDigitArticle: lowercase, number words -> digits, drop articles, contractions."""
  words = [VQA_NUMBERS.get(w, w) for w in text.lower().split()]
  return ' '.join(VQA_CONTRACTIONS.get(w, w) for w in words if w not in _VQA_ARTICLES)


def vqa_normalize_answer(answer: str) -> str:
  """Full normalisation vqaEval applies to every predicted answer."""
  answer = answer.replace('\n', ' ').replace('\t', ' ').strip()
  return vqa_process_digit_article(vqa_process_punctuation(answer))


def vqa_accuracy(predictions: Sequence[str], answer_lists: Sequence[Sequence[str]],
                 return_per_example: bool = False):
  """Official VQA accuracy x 100.

  Per question (as the current GT-Vision-Lab vqaEval.py): the prediction is fully normalised; the
  human answers get only punctuation processing, and only when they are not all identical; the
  score is the mean over annotators i of min(1, #{j != i: answer_j == prediction} / 3). Upstream
  rounds the final number to 2 decimals for display; we return it unrounded.
  """
  if len(predictions) != len(answer_lists):
    raise ValueError(f'{len(predictions)} predictions but {len(answer_lists)} answer lists')
  scores = []
  for q, (pred, answers) in enumerate(zip(predictions, answer_lists)):
    if isinstance(answers, str) or not answers:
      raise ValueError(f'answer_lists[{q}] must be a non-empty list of strings, got {answers!r}')
    pred = vqa_normalize_answer(pred)
    answers = list(answers)
    if len(set(answers)) > 1:
      answers = [vqa_process_punctuation(a) for a in answers]
    matches = [a == pred for a in answers]
    total = sum(matches)
    scores.append(float(np.mean([min(1.0, (total - m) / 3.0) for m in matches])))
  per = 100 * np.array(scores)
  if not len(per):
    raise ValueError('no questions to score')
  return (float(np.mean(per)), per) if return_per_example else float(np.mean(per))


# ------------------------------------------------------------------------------------------------
# ANLS (ST-VQA / DocVQA)
# ------------------------------------------------------------------------------------------------


def levenshtein(a: str, b: str) -> int:
  """Edit distance (insert/delete/substitute, unit costs)."""
  if len(a) < len(b):
    a, b = b, a
  prev = list(range(len(b) + 1))
  for i, ca in enumerate(a, 1):
    cur = [i]
    for j, cb in enumerate(b, 1):
      cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
    prev = cur
  return prev[-1]


def anls(predictions: Sequence[str], answer_lists: Sequence[Sequence[str]], threshold: float = 0.5,
         return_per_example: bool = False):
  """Average Normalised Levenshtein Similarity x 100, as the official ST-VQA/DocVQA scripts.

  Per question: s = 1 - min over answers of NL, NL = lev(a', p') / max(len(a), len(p)) where x' is
  x stripped, lowercased and whitespace-collapsed and the lengths are of the raw strings (as
  upstream); s is zeroed when s < threshold (so NL = 0.5 still scores 0.5, as upstream).
  """
  if len(predictions) != len(answer_lists):
    raise ValueError(f'{len(predictions)} predictions but {len(answer_lists)} answer lists')
  scores = []
  for q, (pred, answers) in enumerate(zip(predictions, answer_lists)):
    if isinstance(answers, str) or not answers:
      raise ValueError(f'answer_lists[{q}] must be a non-empty list of strings, got {answers!r}')
    p = ' '.join(pred.strip().lower().split())
    nls = []
    for ans in answers:
      length = max(len(ans.upper()), len(pred.upper()))
      nls.append(0.0 if length == 0 else
                 levenshtein(' '.join(ans.strip().lower().split()), p) / float(length))
    s = 1 - min(nls)
    scores.append(0.0 if s < threshold else s)
  per = 100 * np.array(scores)
  if not len(per):
    raise ValueError('no questions to score')
  return (float(np.mean(per)), per) if return_per_example else float(np.mean(per))


# ------------------------------------------------------------------------------------------------
# GLUE (as T5's t5.evaluation.metrics / t5.data.postprocessors)
# ------------------------------------------------------------------------------------------------


def string_to_float(string: Any, default: float = -1.0, **unused_kwargs) -> float:
  """T5's STS-B postprocessor: float(string), or ``default`` when that raises ValueError."""
  try:
    return float(string)
  except ValueError:
    return default


def string_label_to_class_id(string_label: Any, label_classes: Sequence[str], default: int = -1,
                             **unused_kwargs) -> int:
  """T5's classification postprocessor: index of the label name, ``default`` if unknown."""
  return list(label_classes).index(string_label) if string_label in label_classes else default


def _pair(targets, predictions) -> Tuple[np.ndarray, np.ndarray]:
  t, p = np.asarray(targets), np.asarray(predictions)
  if t.shape != p.shape or t.ndim != 1:
    raise ValueError(f'targets {t.shape} and predictions {p.shape} must be equal-length 1-D')
  if not len(t):
    raise ValueError('no examples to score')
  return t, p


def accuracy(targets, predictions) -> float:
  """100 * fraction of exact matches (sklearn accuracy_score)."""
  t, p = _pair(targets, predictions)
  return 100 * float(np.mean(t == p))


def f1_score_with_invalid(targets, predictions) -> float:
  """T5's binary F1 x 100 (positive class 1); predictions other than 0/1 count as wrong."""
  t, p = _pair(targets, predictions)
  t = t.astype(np.int64)
  p = np.where((p != 0) & (p != 1), 1 - t, p).astype(np.int64)
  tp = float(np.sum((t == 1) & (p == 1)))
  denom = 2 * tp + float(np.sum((t == 0) & (p == 1))) + float(np.sum((t == 1) & (p == 0)))
  return 100 * (2 * tp / denom if denom else 0.0)  # sklearn's zero_division default -> 0.


def matthews_corrcoef(targets, predictions) -> float:
  """Matthews correlation x 100, multi-class form as sklearn (invalid labels are a class)."""
  t, p = _pair(targets, predictions)
  _, codes = np.unique(np.concatenate([t, p]), return_inverse=True)
  k = int(codes.max()) + 1
  conf = np.zeros((k, k), np.float64)
  np.add.at(conf, (codes[:len(t)], codes[len(t):]), 1)
  t_sum, p_sum = conf.sum(axis=1), conf.sum(axis=0)
  n = p_sum.sum()
  cov_tp = np.trace(conf) * n - np.dot(t_sum, p_sum)
  cov_pp, cov_tt = n ** 2 - np.dot(p_sum, p_sum), n ** 2 - np.dot(t_sum, t_sum)
  return 100 * float(cov_tp / np.sqrt(cov_tt * cov_pp)) if cov_pp * cov_tt else 0.0


def pearson_corrcoef(targets, predictions) -> float:
  """Pearson r x 100 (scipy.stats.pearsonr); NaN when either side is constant, as scipy."""
  t, p = _pair(targets, predictions)
  t, p = t.astype(np.float64) - np.mean(t, dtype=np.float64), p.astype(np.float64) - np.mean(
      p, dtype=np.float64)
  nt, np_ = np.linalg.norm(t), np.linalg.norm(p)
  if nt == 0 or np_ == 0:
    return float('nan')
  return 100 * float(np.clip(np.dot(t / nt, p / np_), -1.0, 1.0))


def _average_ranks(x: np.ndarray) -> np.ndarray:
  """Ranks 1..n with ties sharing their average rank (scipy.stats.rankdata 'average')."""
  order = np.argsort(x, kind='mergesort')
  xs = x[order]
  starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
  ends = np.r_[starts[1:], len(x)]
  ranks = np.empty(len(x), np.float64)
  ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
  return ranks


def spearman_corrcoef(targets, predictions) -> float:
  """Spearman rho x 100 (scipy.stats.spearmanr): Pearson r of average ranks."""
  t, p = _pair(targets, predictions)
  return pearson_corrcoef(_average_ranks(t.astype(np.float64)),
                          _average_ranks(p.astype(np.float64)))


_GLUE_TASKS = ('cola', 'sst2', 'mrpc', 'stsb', 'qqp', 'mnli', 'qnli', 'rte', 'wnli')


def glue_average(scores_by_task: Mapping[str, Any]) -> float:
  """GLUE score: mean over tasks of each task's mean metric (T5's eval_utils convention).

  ``scores_by_task`` maps a task name ('cola', 'glue_mrpc_v002', 'mnli_matched', ...; a 'glue_'
  prefix and '_vNNN' suffix are ignored) to a value or a {metric: value} dict. Tasks with two
  metrics (MRPC/QQP F1 + accuracy, STS-B Pearson + Spearman) are averaged first; MNLI matched and
  mismatched form one task (their mean), as in T5 and the GLUE leaderboard. WNLI counts when
  given (the leaderboard includes it; T5's validation average has no WNLI); AX is not a task.
  """
  groups: Dict[str, List[float]] = collections.defaultdict(list)
  for name, value in scores_by_task.items():
    task = re.sub(r'_v\d+$', '', re.sub(r'^glue_', '', name.lower()))
    task = 'mnli' if task in ('mnli_matched', 'mnli_mismatched', 'mnli_m', 'mnli_mm') else task
    if task not in _GLUE_TASKS:
      raise ValueError(f'unknown GLUE task {name!r}; known: {_GLUE_TASKS} (+ mnli_(mis)matched)')
    values = list(value.values()) if isinstance(value, Mapping) else [value]
    if not values:
      raise ValueError(f'no metrics for GLUE task {name!r}')
    groups[task].append(float(np.mean(values)))
  if not groups:
    raise ValueError('no GLUE tasks given')
  return float(np.mean([np.mean(v) for v in groups.values()]))


# ------------------------------------------------------------------------------------------------
# seqio metric functions: fn(targets, predictions) -> {name: value}
# ------------------------------------------------------------------------------------------------


def seqio_caption_metrics(targets, predictions):
  """targets: list of reference-caption lists; predictions: captions."""
  return caption_metrics(predictions, targets)


def seqio_vqa_accuracy(targets, predictions):
  """targets: list of human-answer lists; predictions: answers."""
  return {'vqa_accuracy': vqa_accuracy(predictions, targets)}


def seqio_anls(targets, predictions):
  """targets: list of answer lists; predictions: answers."""
  return {'anls': anls(predictions, targets)}


def seqio_accuracy(targets, predictions):
  return {'accuracy': accuracy(targets, predictions)}


def seqio_f1_with_invalid(targets, predictions):
  return {'f1': f1_score_with_invalid(targets, predictions)}


def seqio_matthews_corrcoef(targets, predictions):
  return {'matthews_corrcoef': matthews_corrcoef(targets, predictions)}


def seqio_pearson_corrcoef(targets, predictions):
  return {'pearson_corrcoef': pearson_corrcoef(targets, predictions)}


def seqio_spearman_corrcoef(targets, predictions):
  return {'spearman_corrcoef': spearman_corrcoef(targets, predictions)}


#: T5's GLUE metric functions per task (predictions already mapped by the postprocessors above).
GLUE_METRIC_FNS: Dict[str, List[Callable[..., Dict[str, float]]]] = {
    'cola': [seqio_matthews_corrcoef], 'sst2': [seqio_accuracy],
    'mrpc': [seqio_f1_with_invalid, seqio_accuracy],
    'stsb': [seqio_pearson_corrcoef, seqio_spearman_corrcoef],
    'qqp': [seqio_f1_with_invalid, seqio_accuracy], 'mnli': [seqio_accuracy],
    'mnli_matched': [seqio_accuracy], 'mnli_mismatched': [seqio_accuracy], 'qnli': [seqio_accuracy],
    'rte': [seqio_accuracy], 'wnli': [seqio_accuracy], 'ax': [],  # AX: test labels are hidden.
}
