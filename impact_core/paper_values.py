"""The paper's reported numbers (arXiv 2603.15919), typed from its text, to show beside ours.

These are the *paper's* results on DeiT-III B/16 / ImageNet-1K; nothing here is ours.
"""

# Table 1: ImageNet-1K accuracy after pruning and two epochs of fine-tuning.
PAPER_TABLE_1 = {
    "sparsity": [0.0, 0.1, 0.3, 0.5, 0.7, 0.8, 0.9],
    "magnitude": {"top1": [0.8371, 0.8152, 0.8173, 0.8159, 0.8026, 0.7661, 0.5517],
                  "top5": [0.9655, 0.9565, 0.9572, 0.9563, 0.9498, 0.9313, 0.7873]},
    "wanda": {"top1": [0.8371, 0.8154, 0.8174, 0.8158, 0.8044, 0.7687, 0.6151],
              "top5": [0.9655, 0.9563, 0.9564, 0.9565, 0.9510, 0.9343, 0.8426]},
}

# Table 4: attribution faithfulness (Chefer transformer attribution), all ImageNet-1K categories.
PAPER_TABLE_4 = {
    "sparsity": [0.0, 0.1, 0.3, 0.5, 0.7],
    "insertion": [0.600, 0.703, 0.714, 0.706, 0.663],
    "deletion": [0.212, 0.201, 0.200, 0.203, 0.175],
}

# Sec. 4.2 / Fig. 2: the neuron-level setup. Fig. 2 is a violin plot whose values the
# text does not state; its findings are qualitative (quoted in the neuron chapter).
PAPER_FIG_2 = {
    "model": "DeiT-III B/16", "dataset": "ImageNet-1K", "classes": 1000,
    "blocks": [2, 7, 11], "top_k": 50, "sparsities": [0.1, 0.3, 0.5, 0.7],
    "units per block": "3072 MLP neurons + 12 heads (head activation: L2 norm over D=64)",
    "ablation": "mean",
}
