"""Side-by-side benchmarks: leangen vs torchtune's generate recipe vs transformers.

Entry point: ``python benchmarks/run.py --preset llama3_2_1b --reps 3``.
"""
