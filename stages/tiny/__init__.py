"""The tiny world: r1flow's own demo and test bed (a synthetic addition task, a byte-level BPE tokenizer,
1M-parameter Qwen2 models pretrained here, a tiny judge). A guest: the product's modules never import it;
the pipeline reaches it only by name (`world: {kind: tiny}`, pipeline/config.py WORLD_KINDS)."""
