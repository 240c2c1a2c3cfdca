"""(Copied from the project brief's shared/device/naive_baseline.py; one fix: `bench` took its checkpointing
flag as `gc`, which hid the `gc` module it calls, so it is `use_gc` here.)

The plain recipe we must beat, on one GPU: Mistral-7B shapes, random weights.

What a user writes from the original README with stock transformers + peft +
adapters: padded batches of 8 x 512 tokens, gradient checkpointing where it
applies, bf16, a hand-written loop. Measures tokens/s (padded tokens; multiply
by your data's padding efficiency for useful tokens/s) and peak GPU memory for
QLoRA (NF4 + double quant), bf16 LoRA, a Pfeiffer adapter and P-Tuning.
Weight values do not change compute cost, so random weights are enough.

    python3 naive_baseline.py                       # qlora_gc lora_gc adapter_gc ptuning_nogc
    python3 naive_baseline.py qlora_gc qlora_nogc   # METHOD_gc / METHOD_nogc
Writes $OUT/baseline.json.
"""
import gc, json, os, sys, time
import torch
from transformers import MistralConfig, MistralForCausalLM, AutoModelForCausalLM, BitsAndBytesConfig
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

OUT = os.environ.get("OUT", "/tmp")
CK = "/tmp/mistral7b-random"
cfg = MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=int(os.environ.get("LAYERS", 32)), num_attention_heads=32,
                    num_key_value_heads=8, max_position_embeddings=32768, rope_theta=1e6,
                    sliding_window=None, torch_dtype="bfloat16")
results = {}

def build_checkpoint():
    t = time.time()
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = MistralForCausalLM(cfg).to(torch.bfloat16)
    m.save_pretrained(CK, safe_serialization=True)
    del m; torch.cuda.empty_cache()
    print(f"checkpoint built in {time.time()-t:.1f}s", flush=True)

def bench(name, quant, bs=8, seq=512, steps=8, use_gc=True, attn="sdpa", method="lora"):
    gc.collect(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    t = time.time()
    kw = dict(dtype=torch.bfloat16, device_map={"": 0}, attn_implementation=attn)
    if quant:
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    m = AutoModelForCausalLM.from_pretrained(CK, **kw)
    load_s = time.time() - t
    weights_gb = torch.cuda.memory_allocated() / 2**30
    if quant:
        m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=use_gc)
    elif use_gc:
        m.gradient_checkpointing_enable(); m.enable_input_require_grads()
    if method == "lora":
        m = get_peft_model(m, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    elif method == "adapter":  # AdapterHub Pfeiffer bottleneck, 64 dims
        import adapters
        from adapters import SeqBnConfig
        adapters.init(m)
        m.add_adapter("medical", config=SeqBnConfig(reduction_factor=4096 // 64, init_weights="mam_adapter"))
        m.train_adapter("medical")
        m.to("cuda", torch.bfloat16)  # adapters are created on the CPU in fp32
    elif method == "ptuning":
        from peft import PromptEncoderConfig
        m = get_peft_model(m, PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=20))
    m.train()  # gradient checkpointing only acts in training mode
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-4)
    x = torch.randint(0, 32000, (bs, seq), device="cuda")
    times = []
    for i in range(steps + 2):
        torch.cuda.synchronize(); t0 = time.time()
        loss = m(input_ids=x, labels=x).loss
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize(); times.append(time.time() - t0)
    st = sorted(times[2:])[len(times[2:]) // 2]
    r = dict(load_s=round(load_s, 1), weights_gb=round(weights_gb, 2),
             peak_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2),
             step_s=round(st, 3), tokens_per_s=round(bs * seq / st), bs=bs, seq=seq, gc=use_gc)
    print(name, json.dumps(r), flush=True)
    results[name] = r
    del m, opt, loss; gc.collect(); torch.cuda.empty_cache()

if __name__ == "__main__":
    import transformers, peft, bitsandbytes
    print("versions", torch.__version__, transformers.__version__, peft.__version__, bitsandbytes.__version__, flush=True)
    build_checkpoint()
    for spec in sys.argv[1:] or ["qlora_gc", "lora_gc", "adapter_gc", "ptuning_nogc"]:
        meth, g = spec.split("_")
        quant = meth == "qlora"
        bench(f"{spec}_bs8x512", quant, use_gc=(g == "gc"), method="lora" if meth in ("qlora", "lora") else meth)
    json.dump(results, open(os.path.join(OUT, "baseline.json"), "w"), indent=1)
