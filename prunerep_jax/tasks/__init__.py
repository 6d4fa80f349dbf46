"""Evaluation tasks: perplexity and fidelity of a pruned model to its dense original.

Import the functions from their modules (``from prunerep_jax.tasks.perplexity import
perplexity``): re-exporting ``perplexity`` here would shadow the module of the same name, and
``import prunerep_jax.tasks.perplexity as m`` would then bind the function.
"""
