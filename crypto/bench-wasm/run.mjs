// Runs the hush-crypto wasm32 benchmark under node (no wasm-bindgen needed).
//
//   cargo build --release -p hush-crypto-bench-wasm --target wasm32-unknown-unknown
//   node crypto/bench-wasm/run.mjs [path/to/hush_crypto_bench_wasm.wasm] [messages]
import { readFile } from 'node:fs/promises';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';

const defaultPath = fileURLToPath(new URL(
  '../../target/wasm32-unknown-unknown/release/hush_crypto_bench_wasm.wasm', import.meta.url));
const path = process.argv[2] ?? defaultPath;
const n = Number(process.argv[3] ?? 20000);
const MSG_LEN = 1024;

const module = await WebAssembly.compile(await readFile(path));
// Provide the clock; stub anything else the module imports (e.g. unused
// wasm-bindgen glue pulled in by getrandom's wasm_js backend) so a call to it
// fails loudly instead of silently.
const imports = {};
for (const imp of WebAssembly.Module.imports(module)) {
  imports[imp.module] ??= {};
  if (imp.module === 'env' && imp.name === 'now_ms') {
    imports.env.now_ms = () => performance.now();
  } else if (imp.kind === 'function') {
    imports[imp.module][imp.name] = () => { throw new Error(`unexpected import ${imp.module}.${imp.name}`); };
  } else {
    throw new Error(`unsupported import ${imp.module}.${imp.name} (${imp.kind})`);
  }
}
const instance = await WebAssembly.instantiate(module, imports);
const rates = [];
for (let i = 0; i < 5; i++) rates.push(instance.exports.bench(n));
rates.sort((a, b) => a - b);
const median = rates[2];
const mib = median * MSG_LEN / (1024 * 1024);
console.log(`seal+open 1 KiB (wasm32 under node ${process.version}, ${n} msgs, median of 5): ` +
  `${median.toFixed(0)} messages/s, ${mib.toFixed(2)} MiB/s`);
console.log(`  all runs (msg/s): ${JSON.stringify(rates.map(Math.round))}`);
