"""Stream activations from the embedded default (tiny GPT-2-architecture model, bundled corpus), offline."""

import actvpipe

if __name__ == "__main__":
    stream = actvpipe.demo_stream()  # for GPT-2 small: actvpipe.gpt2_stream() (needs the hub)
    print("row shape [in/out, layer, d_model]:", stream.row_shape)
    with stream.buffer(20_000).batch(1024, with_tokens=True) as loader:
        for step, batch in enumerate(loader):
            mlp_in, mlp_out = batch.acts[:, 0], batch.acts[:, 1]  # [batch, layer, d_model] each
            origin = f"context {batch.seq[0]}, position {batch.pos[0]}"
            print(f"step {step}: mlp_in {tuple(mlp_in.shape)}; first row from {origin}")
            if step == 4:
                break
