"""The checks that tests/test_gpu.py makes of the whole model on the GPU, run on the CPU where the code allows: the
compiled model against the eager one, which passes as it is and fails when one block's attention is off in the
compiled model only, and the FP8 lm_head against the bf16 one (torch's FP8 matmul runs on the CPU too)."""
import torch

from test_gpu import (COMPILED_GRAD, COMPILED_LOSS, fp8_against_bf16, loss_and_grads, mismatches,
                      random_tiny_model_and_batch)

CPU = torch.device("cpu")


def test_the_compiled_model_check_sees_one_blocks_attention_switched_off():
    """The tiny model with every matrix random, in fp32 on the CPU's masked attention path, compiled whole graph as
    the trainer compiles it, through dynamo and AOTAutograd, but with eager kernels in place of inductor's: its C++
    compilation of the forward and backward takes minutes on a CI machine, and the golden test runs inductor's whole
    tiny run already. Compiled, it is within the bf16 tolerances of the eager model (far within, in fp32). Then block
    5's attention output matrix is zeroed after the eager run, so that only the compiled model runs without that
    attention: the check must fail, and name that block's attention among what differs."""
    model, inputs, targets, cu = random_tiny_model_and_batch(1, CPU)
    eager = loss_and_grads(model, model, inputs, targets, cu)
    compiled = torch.compile(model, backend="aot_eager", dynamic=False, fullgraph=True)
    assert mismatches(loss_and_grads(compiled, model, inputs, targets, cu), eager, COMPILED_LOSS, COMPILED_GRAD) == []

    with torch.no_grad():
        attn = model.blocks["5"].attn
        attn.qkvo.view(4, attn.num_heads * attn.head_dim, -1)[3].zero_()  # Wo: the block adds nothing from attention
    found = mismatches(loss_and_grads(compiled, model, inputs, targets, cu), eager, COMPILED_LOSS, COMPILED_GRAD)
    assert any(line.startswith("blocks.5.attn.qkvo: gradient off by") for line in found), found


def test_an_fp8_step_matches_a_bf16_step_on_the_same_weights_on_the_cpu():
    """As on the GPU, with the whole model in bf16, so that the head takes bf16 inputs as it does there."""
    model, inputs, targets, cu = random_tiny_model_and_batch(8, CPU)
    assert fp8_against_bf16(model.bfloat16(), inputs, targets, cu) == []
