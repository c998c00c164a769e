"""Prompt templates for the two styles.

* ``raw``: the short PaLI-style task prefixes ('caption en', 'answer en {question}') and, for
  GLUE, T5's own text-to-text format ('cola sentence: ...'), one template each.
* ``mmit`` (multimodal instruction tuning): several instruction paraphrases per task family.
  Training examples draw one per example (seeded, see ``common.format_prompts``); evaluation
  always uses the first one, so reported numbers do not depend on a draw.

Templates use ``{field}`` placeholders naming example features.
"""
from __future__ import annotations

RAW_CAPTION = ('caption en',)
RAW_VQA = ('answer en {question}',)

MMIT_CAPTION = (
    'Write a short caption for this image.',
    'Describe the image in one sentence.',
    'What is shown in this picture? Reply with a brief caption.',
    'Give a concise description of the photo.',
    'Summarize the content of the image in a few words.',
)
MMIT_VQA = (
    'Answer the question about the image with a word or short phrase. Question: {question}',
    'Look at the picture and answer briefly: {question}',
    '{question} Respond with a short answer based on the image.',
    'Question about the image: {question} Short answer:',
    'Use the image to answer this question in a few words. {question}',
)
MMIT_KNOWLEDGE_VQA = (
    'Answer the question using the image and your world knowledge, in a few words. '
    'Question: {question}',
    'Combine what you see with what you know and answer briefly: {question}',
    '{question} Answer with a short phrase; the image and general knowledge are needed.',
    'Question requiring outside knowledge about the image: {question} Short answer:',
    'Using the picture and common knowledge, answer in a few words. {question}',
)
MMIT_TEXT_CAPTION = (
    'Write a short caption for this image that mentions the text visible in it.',
    'Describe the image in one sentence, including any words you can read.',
    'Caption this picture; read the text in it if it matters.',
    'Give a concise description of the photo, quoting the visible text.',
    'Summarize the image in a sentence that uses the written text it contains.',
)
MMIT_TEXT_VQA = (
    'Read the text in the image and answer the question in a few words. Question: {question}',
    'Answer using the words written in the picture: {question}',
    '{question} Look at the text in the image and give a short answer.',
    'Question about the text in this image: {question} Short answer:',
    'Find the answer in the scene text of the image, briefly. {question}',
)
MMIT_DOC_VQA = (
    'Read the document image and answer the question with a short span from it. '
    'Question: {question}',
    'Answer from the document: {question}',
    '{question} Extract the answer from the document shown.',
    'Question about this document: {question} Answer:',
    'Use the text of the scanned page to answer briefly. {question}',
)

# name -> (raw templates, mmit templates)
IMAGE_TEMPLATES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    'coco_captions': (RAW_CAPTION, MMIT_CAPTION),
    'textcaps': (RAW_CAPTION, MMIT_TEXT_CAPTION),
    'vqav2': (RAW_VQA, MMIT_VQA),
    'okvqa': (RAW_VQA, MMIT_KNOWLEDGE_VQA),
    'textvqa': (RAW_VQA, MMIT_TEXT_VQA),
    'stvqa': (RAW_VQA, MMIT_TEXT_VQA),
    'docvqa': (RAW_VQA, MMIT_DOC_VQA),
}

# GLUE raw = T5's preprocessors.glue / .stsb output: '<benchmark> <key>: <value> ...' with the
# keys sorted by name (T5's default order); MNLI's eval variants keep the 'mnli' prefix.
GLUE_RAW: dict[str, tuple[str, ...]] = {
    'cola': ('cola sentence: {sentence}',),
    'sst2': ('sst2 sentence: {sentence}',),
    'mrpc': ('mrpc sentence1: {sentence1} sentence2: {sentence2}',),
    'qqp': ('qqp question1: {question1} question2: {question2}',),
    'stsb': ('stsb sentence1: {sentence1} sentence2: {sentence2}',),
    'mnli': ('mnli hypothesis: {hypothesis} premise: {premise}',),
    'qnli': ('qnli question: {question} sentence: {sentence}',),
    'rte': ('rte sentence1: {sentence1} sentence2: {sentence2}',),
}

# Instruction paraphrases; targets stay T5's label words so metrics are shared.
GLUE_MMIT: dict[str, tuple[str, ...]] = {
    'cola': (
        'Is this sentence grammatically acceptable? Answer acceptable or unacceptable. '
        'Sentence: {sentence}',
        'Sentence: {sentence} Would a linguist rate it acceptable or unacceptable?',
        'Judge the grammaticality of "{sentence}". Options: acceptable, unacceptable.',
        'Decide whether the following is a well-formed English sentence (acceptable / '
        'unacceptable): {sentence}',
    ),
    'sst2': (
        'What is the sentiment of this movie review sentence? Answer positive or negative. '
        'Sentence: {sentence}',
        'Review: {sentence} Is the sentiment positive or negative?',
        'Classify the sentiment of "{sentence}". Options: positive, negative.',
        'Does the following sentence express a positive or a negative opinion? {sentence}',
    ),
    'mrpc': (
        'Do these two sentences mean the same thing? Answer equivalent or not_equivalent. '
        'Sentence 1: {sentence1} Sentence 2: {sentence2}',
        'Sentence 1: {sentence1} Sentence 2: {sentence2} Are they paraphrases (equivalent / '
        'not_equivalent)?',
        'Is "{sentence2}" a paraphrase of "{sentence1}"? Options: equivalent, not_equivalent.',
        'Compare the sentences and say equivalent or not_equivalent. First: {sentence1} '
        'Second: {sentence2}',
    ),
    'qqp': (
        'Do these two questions ask the same thing? Answer duplicate or not_duplicate. '
        'Question 1: {question1} Question 2: {question2}',
        'Question 1: {question1} Question 2: {question2} Are they duplicates (duplicate / '
        'not_duplicate)?',
        'Is "{question2}" a duplicate of "{question1}"? Options: duplicate, not_duplicate.',
        'Say duplicate if the questions have the same intent, otherwise not_duplicate. '
        'First: {question1} Second: {question2}',
    ),
    'stsb': (
        'How similar are these two sentences on a scale from 0 to 5? Sentence 1: {sentence1} '
        'Sentence 2: {sentence2}',
        'Sentence 1: {sentence1} Sentence 2: {sentence2} Rate their semantic similarity '
        'from 0.0 to 5.0.',
        'Give a similarity score between 0 and 5 for "{sentence1}" and "{sentence2}".',
        'Score how close in meaning the sentences are (0 = unrelated, 5 = same meaning). '
        'First: {sentence1} Second: {sentence2}',
    ),
    'mnli': (
        'Does the premise entail the hypothesis? Answer entailment, neutral or contradiction. '
        'Premise: {premise} Hypothesis: {hypothesis}',
        'Premise: {premise} Hypothesis: {hypothesis} Relation (entailment / neutral / '
        'contradiction)?',
        'If "{premise}" is true, is "{hypothesis}" true? Options: entailment, neutral, '
        'contradiction.',
        'Classify the relation of the hypothesis to the premise. Premise: {premise} '
        'Hypothesis: {hypothesis}',
    ),
    'qnli': (
        'Does the sentence contain the answer to the question? Answer entailment or '
        'not_entailment. Question: {question} Sentence: {sentence}',
        'Question: {question} Sentence: {sentence} Does the sentence answer it (entailment / '
        'not_entailment)?',
        'Can "{question}" be answered from "{sentence}"? Options: entailment, not_entailment.',
        'Say entailment if the sentence answers the question, otherwise not_entailment. '
        'Question: {question} Sentence: {sentence}',
    ),
    'rte': (
        'Does the first sentence entail the second? Answer entailment or not_entailment. '
        'Sentence 1: {sentence1} Sentence 2: {sentence2}',
        'Sentence 1: {sentence1} Sentence 2: {sentence2} Entailment or not_entailment?',
        'If "{sentence1}" is true, must "{sentence2}" be true? Options: entailment, '
        'not_entailment.',
        'Decide whether the text implies the claim. Text: {sentence1} Claim: {sentence2}',
    ),
}


def image_templates(benchmark: str, style: str) -> tuple[str, ...]:
  """Templates of a captioning / VQA benchmark in ``style`` ('raw' or 'mmit')."""
  raw, mmit = IMAGE_TEMPLATES[benchmark]
  return raw if style == 'raw' else mmit


def glue_templates(name: str, style: str) -> tuple[str, ...]:
  """Templates of a GLUE task (``'mnli_matched'`` uses MNLI's) in ``style``."""
  base = 'mnli' if name.startswith('mnli') else name
  return GLUE_RAW[base] if style == 'raw' else GLUE_MMIT[base]
