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
