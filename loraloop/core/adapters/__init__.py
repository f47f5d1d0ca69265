"""Per-user LoRA adapters, shared by serving and the learner.

`version`: `AdapterVersion`, one immutable adapter version of one user, and the files of
its directory; `store`: the versioned store on a filesystem; `peft_format`: PEFT's on-disk
format, the only one adapters are stored in.
"""
