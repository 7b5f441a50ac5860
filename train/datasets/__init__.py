"""Datasets: the generated data ferry ships, and the reading of pretraining corpora.

- `dates`: the demo task (dates written many ways → ISO 8601), its JSON Lines writer
  (`write_jsonl`) and the demo's training config; `ferry data dates`;
- `task_data`: generated fine-tuning tasks, one per task head (seasons, same_day, entities, qa,
  stories); `ferry data tasks`;
- `text_corpus`: English prose from the standard library's docstrings; `ferry data docs`;
- `corpus`: pretraining corpora streamed from text / JSONL files or directories, tokenized once
  into a cached token file and read back as fixed-length blocks.

Task files themselves are read by `ferry.records`; batching helpers and the step → examples
order (`global_batch_indices`) live in `ferry.train.data`, beside the objectives and the loop
that use them.
"""
