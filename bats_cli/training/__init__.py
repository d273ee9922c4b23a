"""Layer 4: running a network: the run loop, the memory/time plan, the trainer, evaluation, distillation and export."""
