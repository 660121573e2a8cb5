// Runs the hush-crypto wasm32 benchmark under node (no wasm-bindgen needed).
//
//   cargo build --release -p hush-crypto-bench-wasm --target wasm32-unknown-unknown
//   node crypto/bench-wasm/run.mjs [path/to/hush_crypto_bench_wasm.wasm] [messages]
import { readFile } from 'node:fs/promises';
import { readFileSync } from 'node:fs';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';

const defaultPath = fileURLToPath(new URL(
  '../../target/wasm32-unknown-unknown/release/hush_crypto_bench_wasm.wasm', import.meta.url));
const path = process.argv[2] ?? defaultPath;
const n = Number(process.argv[3] ?? 20000);
const MSG_LEN = 1024;

// On-CPU time of this thread (Linux: first field of schedstat, nanoseconds).
// Elsewhere it falls back to wall time, and the CPU line repeats the wall rate.
function cpuMs() {
  try {
    return Number(readFileSync('/proc/thread-self/schedstat', 'utf8').split(' ')[0]) / 1e6;
  } catch {
    return performance.now();
  }
}

const module = await WebAssembly.compile(await readFile(path));
// Provide the clock; stub anything else the module imports (e.g. unused
// wasm-bindgen glue pulled in by getrandom's wasm_js backend) so a call to it
// fails loudly instead of silently.
const imports = {};
for (const imp of WebAssembly.Module.imports(module)) {
  imports[imp.module] ??= {};
  if (imp.module === 'env' && imp.name === 'now_ms') {
    imports.env.now_ms = () => performance.now();
  } else if (imp.module === 'env' && imp.name === 'cpu_ms') {
    imports.env.cpu_ms = cpuMs;
  } else if (imp.kind === 'function') {
    imports[imp.module][imp.name] = () => { throw new Error(`unexpected import ${imp.module}.${imp.name}`); };
  } else {
    throw new Error(`unsupported import ${imp.module}.${imp.name} (${imp.kind})`);
  }
}
const instance = await WebAssembly.instantiate(module, imports);
// Known answers through the AEAD backend of this very build (the simd128 build
// uses hush-crypto's own ChaCha20-Poly1305): a failure must stop the run.
if (instance.exports.self_check() !== 0) {
  console.error('hush-crypto self-test FAILED in this wasm build: not benchmarking it');
  process.exit(1);
}
console.log('hush-crypto self-test passed in this wasm build');
const rates = [];
const cpuRates = [];
for (let i = 0; i < 5; i++) {
  rates.push(instance.exports.bench(n));
  cpuRates.push(instance.exports.last_cpu_rate());
}
for (const r of [rates, cpuRates]) r.sort((a, b) => a - b);
const mib = (rate) => (rate * MSG_LEN / (1024 * 1024)).toFixed(2);
console.log(`seal+open 1 KiB (wasm32 under node ${process.version}, ${n} msgs, median of 5): ` +
  `${rates[2].toFixed(0)} messages/s, ${mib(rates[2])} MiB/s`);
console.log(`  all runs (msg/s): ${JSON.stringify(rates.map(Math.round))}`);
console.log(`  per on-CPU second (less sensitive to a loaded machine): median ` +
  `${cpuRates[2].toFixed(0)} messages/s, ${mib(cpuRates[2])} MiB/s; all runs ` +
  `${JSON.stringify(cpuRates.map(Math.round))}`);
const aead = [];
for (let i = 0; i < 5; i++) aead.push(instance.exports.bench_aead(n));
aead.sort((a, b) => a - b);
console.log(`  AEAD only (seal_at_rest + open_at_rest, 1,088 B + 300 B AD), per on-CPU second: ` +
  `median ${aead[2].toFixed(0)} round trips/s; all runs ${JSON.stringify(aead.map(Math.round))}`);
