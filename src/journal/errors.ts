/**
 * Typed errors of the journal. Callers (the receiver, the manager, the CLI)
 * catch these by class; each carries the objects it names.
 */

/** A stream's record arrived with a sequence number past the next expected one. */
export class SequenceGapError extends Error {
  readonly code = 'ESEQGAP';
  constructor(readonly stream: number, readonly expected: number, readonly got: number) {
    super(`Cannot append to stream ${stream} as sequence ${got} leaves a gap: expected ${expected}`);
  }
}

/** A stream's record arrived with a sequence number already journaled (or queued). */
export class DuplicateSequenceError extends Error {
  readonly code = 'ESEQDUP';
  constructor(readonly stream: number, readonly expected: number, readonly got: number) {
    super(`Cannot append to stream ${stream} as sequence ${got} is a duplicate: expected ${expected}`);
  }
}

/** No datastore of the pool can take another storage unit. */
export class DatastoreFullError extends Error {
  readonly code = 'ENOSPC';
  constructor(readonly journal: string, readonly unitBytes: number, readonly reasons: string[]) {
    super(`Cannot take a storage unit of ${unitBytes} bytes for journal '${journal}' as every datastore is full: ${reasons.join('; ')}`);
  }
}

/** A view's scratch area reached its size limit. */
export class ScratchFullError extends Error {
  readonly code = 'ENOSPC';
  constructor(readonly view: string, readonly scratchBytesMax: number) {
    super(`Cannot write to recovery view '${view}' as its scratch area is full: limit is ${scratchBytesMax} bytes`);
  }
}

/** A view's point in time was promoted into the replica by the hard size limit. */
export class ViewInvalidatedError extends Error {
  readonly code = 'ESTALE';
  constructor(readonly view: string, readonly reason: string) {
    super(`Cannot read recovery view '${view}' as it was invalidated: ${reason}`);
  }
}

/** The requested time or checkpoint is older than the oldest recoverable point, or not (yet) recoverable. */
export class RecoveryPointUnavailableError extends Error {
  readonly code = 'ENOENT';
  constructor(what: string, reason: string) {
    super(`Cannot build a recovery view at ${what} as ${reason}`);
  }
}

/** The journal's files are damaged in a way that is not a torn tail. */
export class JournalDamagedError extends Error {
  readonly code = 'EIO';
  constructor(readonly journal: string, detail: string) {
    super(`Cannot open journal '${journal}' as it is damaged: ${detail}`);
  }
}

/** An earlier write or sync failed; the journal refuses further work until it is reopened. */
export class JournalFailedError extends Error {
  readonly code = 'EIO';
  constructor(journal: string, cause: unknown) {
    super(`Cannot use journal '${journal}' as an earlier write or sync failed (reopen it to recover from its durable state)`, { cause });
  }
}

/** A record that can never be valid (unknown volume, out of bounds, too large). */
export class InvalidRecordError extends Error {
  readonly code = 'EINVAL';
}
