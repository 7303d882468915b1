"""A .cu file → host C++ for the emulation (tests/cuda/emu/run.sh): kernel<<<grid, block, smem, stream>>>(args);
becomes ::emu::launch(::emu::cfg(grid, block, smem, stream), [&] { kernel(args); }); and extern __shared__ arrays
point into the launch's dynamic shared memory."""
import re
import sys

src = open(sys.argv[1]).read()
src = re.sub(r'extern __shared__ (\w+) (\w+)\[\];', r'\1* \2 = reinterpret_cast<\1*>(::emu::dyn.data());', src)
src = re.sub(r'([\w:]+(?:<[^<>;()]*>)?)<<<(.*?)>>>\((.*?)\);',
             lambda m: '::emu::launch(::emu::cfg(%s), [&] { %s(%s); });' % (m.group(2), m.group(1), m.group(3)),
             src, flags=re.S)
open(sys.argv[2], 'w').write(src)
