"""torch.mm GFLOP/s at the training step's shapes (scripts/bench_sgemm.sh): python torch_mm.py [THREADS]"""
import sys
import time

import torch

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
print("| shape | torch.mm GFLOP/s |")
print("|---|---:|")
shapes=[("qkv fwd",2048,384,1152,False,True),("mlp fc fwd",2048,384,1536,False,True),("mlp proj fwd",2048,1536,384,False,True),("dX = dY W",2048,1536,384,False,False),("dW = dY^T X",1536,2048,384,True,False),("expert fc (128 rows)",128,384,1536,False,True),("expert dW (128 rows)",1536,128,384,True,False),("default fc 384x128x512",384,128,512,False,True),("default dW 512x384x128",512,384,128,True,False),("attn qk 256x64x256",256,64,256,False,True)]
for name,m,k,n,ta,tb in shapes:
    a=torch.randn(k,m).t() if ta else torch.randn(m,k)
    b=torch.randn(n,k).t() if tb else torch.randn(k,n)
    flops=2*m*k*n; reps=max(3,int(3e9/flops)); best=1e9
    for _ in range(3):
        t0=time.perf_counter()
        for _ in range(reps): torch.mm(a,b)
        best=min(best,(time.perf_counter()-t0)/reps)
    print(f"| {name} | {flops/best/1e9:.0f} |")
