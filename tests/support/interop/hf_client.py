"""What a Hugging Face user does with our exports (runs in .venv-hf: torch,
transformers, peft; never imports gemma_mt).

    python hf_client.py REQUEST.json OUT.npz

REQUEST: {"model": dir, "adapter": dir or null, "tokens": [[...], ...],
"greedy": [[prompt ids], ...], "max_new_tokens": n, "texts": [...]}.
OUT: logits (float32, per row of `tokens`), greedy_<i> (new ids), the
AutoTokenizer ids of `texts` (text_<i>) and its chat-template rendering.
"""

import json
import sys

import numpy as np
import torch
import transformers


def main(request_path: str, out_path: str) -> None:
  req = json.loads(open(request_path).read())
  model = transformers.AutoModelForCausalLM.from_pretrained(
      req['model'], dtype=torch.float32)
  if req.get('adapter'):
    import peft
    model = peft.PeftModel.from_pretrained(model, req['adapter'])
    model = model.merge_and_unload()
  model.eval()
  out = {}
  with torch.no_grad():
    if req.get('tokens'):
      tokens = torch.tensor(req['tokens'])
      out['logits'] = model(tokens).logits.float().numpy()
    for i, prompt in enumerate(req.get('greedy', [])):
      ids = torch.tensor([prompt])
      gen = model.generate(ids, attention_mask=torch.ones_like(ids),
                           max_new_tokens=req['max_new_tokens'],
                           do_sample=False)
      out[f'greedy_{i}'] = gen[0, len(prompt):].numpy()
  if req.get('texts') is not None:
    tok = transformers.AutoTokenizer.from_pretrained(req['model'])
    for i, text in enumerate(req['texts']):
      out[f'text_{i}'] = np.asarray(tok(text)['input_ids'])
    if tok.chat_template:
      chat = tok.apply_chat_template(
          [{'role': 'user', 'content': req['texts'][0]}], tokenize=False)
      out['chat'] = np.frombuffer(chat.encode(), np.uint8)
  np.savez(out_path, **out)


if __name__ == '__main__':
  main(*sys.argv[1:])
