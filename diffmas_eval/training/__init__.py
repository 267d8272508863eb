"""DiffMAS training (methods.md §4): LoRA adapters learned end to end through the multi-agent latent trace.

Modules: `config` (the flat, documented settings), `data` (train splits, decontamination), `lora` (adapters),
`unroll` (the loss through the trace), `checkpoint` (atomic, resumable), `trainer` (the loop), `cli`.
"""
