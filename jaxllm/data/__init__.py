"""Training data, in layers; each module imports only modules of the layers below it.

  rows.py           the batch row schema (ROW_FIELDS) and row helpers (numpy only)
  files.py          source specs -> files; the decompressed-jsonl cache; SourceError
  records.py        indexed readers of jsonl / parquet / ArrayRecord records; RecordSource
  shards.py         prepared token shards (PreparedSource)
  documents.py      pretraining documents (open_source), Tokenize
  tokenizer.py, hf_tokenizer.py     tokenizers ("auto" trains on documents)
  sp_model.py       SentencePiece model protos (piece-encoding variants, tokenizer.json conversion)
  chat_template.py  chat templates (Jinja2, {% generation %} blocks), where to read them
  chat.py           conversations -> (ids, loss mask), token-exact with transformers
  hf_export.py      a run's tokenizer and template as Hugging Face files
  preference_data.py                pairs / KTO records -> rows
  examples.py       post-training records -> examples of a format (sft, pairs, kto)
  packing.py        documents -> packed rows;  sft_packing.py: SFT examples -> packed rows
  batching.py       what the batch pipelines share (process layout, fixed eval batches)
  curriculum.py, mixture.py, pipeline.py     pretraining batches (mixtures through stages)
  posttrain.py      post-training batches
  prepare.py        the token-shard writer and its command line (imported by nothing in data/)
  synthetic.py      synthetic post-training tasks (standalone)

Import the modules themselves; this package re-exports nothing, so importing one layer does not
import the layers above it.
"""
