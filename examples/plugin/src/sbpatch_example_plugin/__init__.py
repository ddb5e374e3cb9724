"""An sbpatch plug-in example: ``mini_attacks`` (a toy attack library) and ``adapter`` (its sbpatch Integration)."""
