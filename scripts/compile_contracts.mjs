#!/usr/bin/env node
// Compiles contracts/*.sol with the npm `solc` package (solc-js, standard JSON) and writes the
// artefacts the relay loads at runtime into relay/abi/ (shipped inside the package):
//
//   TestUSDC.json    {contractName, abi, deployedBytecode, compiler, sourceSha256}
//   Multicall3.json  same shape
//   USDC.abi.json    the subset of the USDC ABI the service calls (also valid for real USDC)
//
// The artefacts are committed; run `npm run compile` only after editing a .sol file.
// deployedBytecode is RUNTIME code: it is placed with anvil_setCode, never deployed, so the
// contracts have no constructor and no immutables.

import { createHash } from 'node:crypto'
import { readFileSync, writeFileSync, mkdirSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import solc from 'solc'

const root = join(dirname(fileURLToPath(import.meta.url)), '..')
const contractsDir = join(root, 'contracts')
const outDir = join(root, 'relay', 'abi')

const CONTRACTS = [
  { file: 'TestUSDC.sol', name: 'TestUSDC' },
  { file: 'Multicall3.sol', name: 'Multicall3' },
]

const SETTINGS = {
  optimizer: { enabled: true, runs: 200 },
  evmVersion: 'cancun',
  metadata: { appendCBOR: false },
  outputSelection: { '*': { '*': ['abi', 'evm.deployedBytecode.object'] } },
}

// Functions and events of USDC the relay service calls; matches Circle's FiatTokenV2_2.
const USDC_FUNCTIONS = new Set([
  'transferWithAuthorization',
  'receiveWithAuthorization',
  'authorizationState',
  'balanceOf',
  'transfer',
  'name',
  'version',
  'decimals',
  'DOMAIN_SEPARATOR',
])
const USDC_EVENTS = new Set(['Transfer', 'AuthorizationUsed'])

const sources = {}
const shas = {}
for (const { file } of CONTRACTS) {
  const content = readFileSync(join(contractsDir, file), 'utf8')
  sources[file] = { content }
  shas[file] = createHash('sha256').update(content).digest('hex')
}

const output = JSON.parse(
  solc.compile(JSON.stringify({ language: 'Solidity', sources, settings: SETTINGS })),
)

let failed = false
for (const diagnostic of output.errors ?? []) {
  const text = diagnostic.formattedMessage ?? diagnostic.message
  if (diagnostic.severity === 'error') {
    failed = true
    console.error(text)
  } else {
    console.warn(text)
  }
}
if (failed) {
  console.error('compilation failed')
  process.exit(1)
}

const compiler = {
  name: 'solc-js',
  version: solc.version(),
  settings: { optimizer: SETTINGS.optimizer, evmVersion: SETTINGS.evmVersion, metadata: SETTINGS.metadata },
}

function writeJson(name, value) {
  const path = join(outDir, name)
  writeFileSync(path, JSON.stringify(value, null, 2) + '\n')
  console.log(`wrote ${path}`)
}

mkdirSync(outDir, { recursive: true })
const artefacts = {}
for (const { file, name } of CONTRACTS) {
  const contract = output.contracts?.[file]?.[name]
  if (!contract) {
    console.error(`no output for ${file}:${name}`)
    process.exit(1)
  }
  const runtime = contract.evm.deployedBytecode.object
  if (!runtime) {
    console.error(`${name} has empty runtime bytecode`)
    process.exit(1)
  }
  artefacts[name] = {
    contractName: name,
    source: `contracts/${file}`,
    sourceSha256: shas[file],
    compiler,
    abi: contract.abi,
    deployedBytecode: '0x' + runtime,
  }
  writeJson(`${name}.json`, artefacts[name])
}

const usdcAbi = artefacts.TestUSDC.abi.filter(
  (entry) =>
    (entry.type === 'function' && USDC_FUNCTIONS.has(entry.name)) ||
    (entry.type === 'event' && USDC_EVENTS.has(entry.name)),
)
const missing = [...USDC_FUNCTIONS, ...USDC_EVENTS].filter(
  (wanted) => !usdcAbi.some((entry) => entry.name === wanted),
)
if (missing.length) {
  console.error(`USDC ABI subset lacks: ${missing.join(', ')}`)
  process.exit(1)
}
writeJson('USDC.abi.json', usdcAbi)
