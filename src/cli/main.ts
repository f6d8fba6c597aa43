/**
 * `lifeline`: one command with subcommands.
 */
import { runNbdServe } from './nbd-serve.js';
import { runDemo } from './demo.js';
import { runJournal } from './journal.js';
import { runFaultProxy } from '../faultproxy/cli.js';
import { runCerts } from './certs.js';
import { runAppliance } from './appliance.js';
import { UsageError } from './usage-error.js';

const usage = `Usage: lifeline <command> [options]

Commands:
  demo            serve a fresh volume over NBD with the tap on and show, live,
                  the writes it intercepts (a built-in workload writes to it)
  nbd serve       serve raw image files over NBD through the tap
  appliance       run an appliance: serve and protect volumes, receive streams
                  into journals (--data DIR --config FILE)
  journal inspect|verify DIR
                  list a journal's units, streams and checkpoints, or check every record
  fault-proxy     forward TCP to a target through injected faults (for tests)
  certs init-ca|issue|demo
                  make a site CA and appliance certificates for the mutual TLS link
  help            show this text

Run 'lifeline <command> --help' for a command's options.`;

export async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  try {
    switch (command) {
      case 'nbd':
        if (rest[0] === 'serve') {
          await runNbdServe(rest.slice(1));
          return Number(process.exitCode ?? 0);
        }
        throw new UsageError(`Unknown 'nbd' subcommand '${rest[0] ?? ''}': try 'lifeline nbd serve --help'`);
      case 'journal':
        return await runJournal(rest);
      case 'fault-proxy':
        return await runFaultProxy(rest);
      case 'appliance':
        return await runAppliance(rest);
      case 'certs':
        return await runCerts(rest);
      case 'demo':
        await runDemo(rest);
        return Number(process.exitCode ?? 0);
      case undefined:
      case 'help':
      case '--help':
      case '-h':
        console.log(usage);
        return 0;
      default:
        throw new UsageError(`Unknown command '${command}'`);
    }
  } catch (error) {
    if (error instanceof UsageError || (error as { code?: string }).code?.startsWith('ERR_PARSE_ARGS')) {
      console.error(`lifeline: ${(error as Error).message}\nRun 'lifeline help' for usage.`);
      return 2;
    }
    const cause = (error as Error).cause;
    console.error(`lifeline: ${(error as Error).message}${cause ? ` (${(cause as Error).message ?? cause})` : ''}`);
    return 1;
  }
}

process.on('unhandledRejection', (reason) => {
  console.error('lifeline: internal error (unhandled rejection):', reason);
  process.exit(70);
});

main(process.argv.slice(2)).then((code) => process.exit(code));
