/**
 * The appliance's control API: HTTP/JSON on a local address. The manager will
 * drive appliances through it; until then operators and tests use it with
 * curl. Errors become responses in one place (`handle`), as
 * `{ "error": { "code", "message" } }` with a fitting status.
 *
 *   GET    /v1/status                          appliance, volumes, every group
 *   GET    /v1/groups/:group                   one group (source or target role)
 *   POST   /v1/protect                         add protection (a ProtectConfig), also to volumes being served
 *   DELETE /v1/groups/:group                   {"drainMs": N} remove protection; the volumes stay served
 *   PUT    /v1/rate                            {"bytesPerSecond": N} the appliance's limit (0: none)
 *   PUT    /v1/groups/:group/rate              {"bytesPerSecond": N} a group's limit
 *   POST   /v1/groups/:group/quiesce           {"timeoutMs": N} hold write completions
 *   POST   /v1/groups/:group/release           end the hold
 *   POST   /v1/groups/:group/sync                {"mode": "delta"} compare every block with the target
 *   POST   /v1/groups/:group/checkpoint        {"kind": "tagged", "name": "..."} marker into the stream
 *   GET    /v1/groups/:group/checkpoints       checkpoints in the target's journal
 *   POST   /v1/groups/:group/views             {"volume", "checkpoint"|"timeMs"|"latest"} export a recovery view over NBD
 *   GET    /v1/groups/:group/views             open views
 *   DELETE /v1/groups/:group/views/:name       close a view (its scratch writes are thrown away)
 *
 * Protection added or removed and limits set here outlive a restart (`control-changes.ts`); a change
 * in force that could not be recorded answers 500 `not-recorded`.
 */
import * as http from 'node:http';
import type { Logger } from '../util/logger.js';
import { formatAddress } from '../util/address.js';
import { ControlChangeNotRecorded, LimitReached, ProtectionChangeRefused, stopDrainMsMax, type Appliance } from './appliance.js';
import { ConfigError, parseProtectConfig } from './config.js';
import type { ViewPoint } from '../journal/journal.js';

/** 'latest': the largest time a Date can hold, so every durable write is included. */
const latestTimeMs = 8_640_000_000_000_000;
/** Scratch space a view gets for test writes unless the request says otherwise. */
export const viewScratchBytesDefault = 1024 * 1024 * 1024;
/** Longest a removal of protection may wait for the target to acknowledge what is queued. */
export const removeDrainMsMax = 600_000;
/** Largest request body the API reads. */
export const requestBodyBytesMax = 64 * 1024;
/** Checkpoint kinds a caller may ask for; the others ('sync-begin', 'sync-end', 'protection-end') are the appliance's own. */
export const checkpointKindsAllowed: readonly string[] = ['tagged', 'automatic'];
/**
 * How far ahead of this appliance's clock a view's `timeMs` may be: the source stamps writes with
 * its own clock, which may run a little ahead of the target's. A time further ahead has not
 * happened yet, and a view there would change as writes arrive.
 */
export const viewTimeAheadMsMax = 5_000;
/** What a refused request may wait before it tries again (the Retry-After of a 429). */
export const retryAfterSeconds = 1;
/**
 * Longest a client may take to send a whole request (headers and body): a request counts against
 * `control.requestsInFlightMax` from its headers on, so one that sends its body slowly, or never,
 * holds its place for at most this long. Answering may take longer (a removal's drain).
 */
export const requestReceiveMsMax = 30_000;
/** How often the server looks for requests past `requestReceiveMsMax`. */
const requestTimeoutCheckMs = 1_000;

class ApiError extends Error {
  /** `closeConnection`: the request's body was not read to its end, so the answer closes the connection. */
  constructor(readonly status: number, readonly code: string, message: string, readonly closeConnection = false) {
    super(message);
  }
}

/**
 * Reads a request's body to its end, keeping it when `keep` (else dropping it): `over` when it is
 * longer than `requestBodyBytesMax` (reading stops there, so the answer must close the connection),
 * `failed` when the request broke off. An answer must not leave before the body is read: closing a
 * connection with unread bytes resets it, and a client still sending may then never read the answer;
 * a body read to its end also leaves the connection ready for the client's next request.
 */
function receiveBody(request: http.IncomingMessage, keep: boolean): Promise<{ body: Buffer } | { over: true } | { failed: Error }> {
  return new Promise((resolve) => {
    const chunks: Buffer[] = [];
    let bytes = 0;
    const finish = (result: { body: Buffer } | { over: true } | { failed: Error }): void => {
      request.off('data', onData);
      request.off('end', onEnd);
      request.off('error', onError);
      request.off('close', onClose);
      if (!('body' in result)) request.pause();
      resolve(result);
    };
    const onData = (chunk: Buffer): void => {
      bytes += chunk.length;
      if (bytes > requestBodyBytesMax) finish({ over: true });
      else if (keep) chunks.push(chunk);
    };
    const onEnd = (): void => finish({ body: Buffer.concat(chunks) });
    const onError = (error: Error): void => finish({ failed: error });
    const onClose = (): void => finish({ failed: new Error('the request was closed before its body ended') });
    request.on('data', onData);
    request.once('end', onEnd);
    request.once('error', onError);
    request.once('close', onClose);
  });
}

async function readBody(request: http.IncomingMessage): Promise<unknown> {
  const received = await receiveBody(request, true);
  if ('over' in received) throw new ApiError(413, 'too-large', `The request body is over ${requestBodyBytesMax} bytes`, true);
  if ('failed' in received) throw received.failed;
  if (received.body.length === 0) return {};
  let parsed: unknown;
  try {
    parsed = JSON.parse(received.body.toString('utf8'));
  } catch {
    throw new ApiError(400, 'bad-json', 'The request body is not valid JSON');
  }
  if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) throw new ApiError(400, 'bad-request', 'The request body must be a JSON object');
  return parsed;
}

function numberField(body: unknown, name: string, minimum: number, maximum = Number.MAX_SAFE_INTEGER): number {
  const value = (body as Record<string, unknown> | null)?.[name];
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < minimum || value > maximum) {
    throw new ApiError(400, 'bad-request', `'${name}' must be a whole number from ${minimum} to ${maximum}`);
  }
  return value;
}

/** Sends `body` as JSON; `closeConnection` when the request's body was not read to its end. */
function answer(response: http.ServerResponse, status: number, body: unknown, headers: Record<string, string>, closeConnection: boolean): void {
  const text = JSON.stringify(body, null, 2) + '\n';
  response.writeHead(status, { 'content-type': 'application/json', 'content-length': String(Buffer.byteLength(text)), ...headers, ...(closeConnection ? { connection: 'close' } : {}) });
  response.end(text);
}

/** Decodes a percent-encoded path segment; a malformed escape is a 400. */
function decodeSegment(segment: string): string {
  try {
    return decodeURIComponent(segment);
  } catch {
    throw new ApiError(400, 'bad-path', `The path segment '${segment.slice(0, 256)}' holds a malformed percent escape`);
  }
}

export class ControlApi {
  private readonly server: http.Server;
  /** Requests being handled (routed, answered); at most `requestsInFlightMax`. */
  private inFlight = 0;
  private readonly requestsInFlightMax: number;

  constructor(private readonly appliance: Appliance, private readonly logger: Logger) {
    this.requestsInFlightMax = appliance.config.control.requestsInFlightMax;
    // The server checks requestTimeout every connectionsCheckingInterval (30 s by default, which
    // would let a request hold its place for up to twice requestReceiveMsMax).
    this.server = http.createServer({ requestTimeout: requestReceiveMsMax, connectionsCheckingInterval: requestTimeoutCheckMs }, (request, response) => void this.handle(request, response));
  }

  /** Requests being handled now. */
  get requestsInFlight(): number {
    return this.inFlight;
  }

  listen(address: { host: string; port: number }): Promise<string> {
    return new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(address.port, address.host, () => {
        this.server.off('error', reject);
        resolve(formatAddress(this.server.address()));
      });
    });
  }

  close(): Promise<void> {
    return new Promise((resolve) => {
      this.server.close(() => resolve());
      this.server.closeAllConnections();
    });
  }

  private async handle(request: http.IncomingMessage, response: http.ServerResponse): Promise<void> {
    if (this.inFlight >= this.requestsInFlightMax) {
      // Refused before anything is done; its body is read and dropped first (see receiveBody).
      const message = `Appliance '${this.appliance.config.appliance.name}' is handling ${this.inFlight} of its ${this.requestsInFlightMax} control requests at once (control.requestsInFlightMax); try again in a moment`;
      const received = await receiveBody(request, false);
      answer(response, 429, { error: { code: 'limit-reached', message } }, { 'retry-after': String(retryAfterSeconds) }, !('body' in received));
      return;
    }
    this.inFlight++;
    let status = 200;
    let body: unknown;
    let closeConnection = false;
    try {
      body = await this.route(request);
    } catch (error) {
      if (error instanceof ApiError) closeConnection = error.closeConnection;
      if (error instanceof LimitReached) {
        status = 409;
        body = { error: { code: 'limit-reached', message: error.message } };
      } else if (error instanceof ApiError) {
        status = error.status;
        body = { error: { code: error.code, message: error.message } };
      } else if (error instanceof ConfigError) {
        status = 400;
        body = { error: { code: 'bad-config', message: error.message } };
      } else if (error instanceof ControlChangeNotRecorded) {
        // The change is in force: the caller learns that a restart would undo it.
        status = 500;
        body = { error: { code: 'not-recorded', message: error.message } };
      } else {
        const message = error instanceof Error ? error.message : String(error);
        status = 500;
        body = { error: { code: 'internal', message } };
        this.logger.error('control API request failed', { method: request.method, url: request.url, error: message });
      }
    } finally {
      // Counted out before the answer leaves: a caller that has its answer finds the place free.
      this.inFlight--;
    }
    answer(response, status, body, {}, closeConnection);
  }

  private async route(request: http.IncomingMessage): Promise<unknown> {
    const url = new URL(request.url ?? '/', 'http://appliance');
    const parts = url.pathname.split('/').filter(Boolean).map(decodeSegment);
    const method = request.method ?? 'GET';
    const appliance = this.appliance;
    if (parts[0] !== 'v1') throw new ApiError(404, 'not-found', `No route ${method} ${url.pathname} (routes start with /v1/)`);
    const route = `${method} /${parts.slice(1, 2).join('/')}${parts.length > 2 ? '/:group' : ''}${parts.length > 3 ? `/${parts[3]}` : ''}${parts.length > 4 ? '/:name' : ''}`;
    const groupName = parts[2];
    const source = groupName === undefined ? undefined : appliance.sources.get(groupName);
    const target = groupName === undefined ? undefined : appliance.targets.get(groupName);
    const needSource = () => {
      if (!source) throw new ApiError(404, 'unknown-group', `Appliance '${appliance.config.appliance.name}' protects no group '${groupName}' as a source`);
      return source;
    };
    const needTarget = () => {
      if (!target) throw new ApiError(404, 'unknown-group', `Appliance '${appliance.config.appliance.name}' receives no group '${groupName}'`);
      return target;
    };
    switch (route) {
      case 'GET /status':
        return appliance.status();
      case 'GET /groups/:group':
        if (source) return source.status();
        if (target) return target.status();
        throw new ApiError(404, 'unknown-group', `Appliance '${appliance.config.appliance.name}' has no group '${groupName}'`);
      case 'POST /protect': {
        const protect = parseProtectConfig(await readBody(request), 'protect', process.cwd());
        try {
          const group = await appliance.addSource(protect);
          return group.status();
        } catch (error) {
          if (error instanceof ControlChangeNotRecorded) throw error;
          throw new ApiError(409, 'cannot-protect', (error as Error).message);
        }
      }
      case 'DELETE /groups/:group': {
        if (!source && target) throw new ApiError(409, 'cannot-unprotect', `Appliance '${appliance.config.appliance.name}' receives group '${groupName}'; protection is removed at its source appliance`);
        needSource();
        const body = (await readBody(request)) as Record<string, unknown>;
        const drainMs = body['drainMs'] === undefined ? stopDrainMsMax : numberField(body, 'drainMs', 0, removeDrainMsMax);
        try {
          return await appliance.removeSource(groupName!, drainMs);
        } catch (error) {
          // Another removal of the group got there first, or the appliance is stopping.
          if (error instanceof ProtectionChangeRefused) throw new ApiError(error.code === 'unknown-group' ? 404 : 409, error.code === 'unknown-group' ? 'unknown-group' : 'cannot-unprotect', error.message);
          throw error;
        }
      }
      case 'PUT /rate': {
        const bytesPerSecond = numberField(await readBody(request), 'bytesPerSecond', 0);
        await appliance.setRateLimit(bytesPerSecond);
        return { rateLimitBytesPerSecond: bytesPerSecond };
      }
      case 'PUT /groups/:group/rate': {
        needSource();
        const bytesPerSecond = numberField(await readBody(request), 'bytesPerSecond', 0);
        try {
          await appliance.setGroupRateLimit(groupName!, bytesPerSecond);
        } catch (error) {
          // Its protection was removed while the request was read.
          if (error instanceof ProtectionChangeRefused) throw new ApiError(404, 'unknown-group', error.message);
          throw error;
        }
        return { group: groupName, rateLimitBytesPerSecond: bytesPerSecond };
      }
      case 'POST /groups/:group/quiesce': {
        const group = needSource();
        const timeoutMs = numberField(await readBody(request), 'timeoutMs', 1, 60_000);
        try {
          group.quiesce(timeoutMs);
        } catch (error) {
          throw new ApiError(409, 'cannot-quiesce', (error as Error).message);
        }
        return { group: group.name, quiesced: true, timeoutMs };
      }
      case 'POST /groups/:group/release':
        return { group: needSource().name, released: needSource().release() };
      case 'POST /groups/:group/sync': {
        const group = needSource();
        const body = (await readBody(request)) as Record<string, unknown>;
        if (body['mode'] !== 'delta') throw new ApiError(400, 'bad-request', `'mode' must be 'delta' (compare every block with the target by checksum and ship the ones that differ)`);
        try {
          return { group: group.name, sync: await group.requestDeltaSync('requested through the control API') };
        } catch (error) {
          throw new ApiError(409, 'cannot-sync', (error as Error).message);
        }
      }
      case 'POST /groups/:group/checkpoint': {
        const group = needSource();
        const body = (await readBody(request)) as Record<string, unknown>;
        const kind = body['kind'] ?? 'tagged';
        const name = body['name'];
        if (typeof kind !== 'string' || !checkpointKindsAllowed.includes(kind)) {
          throw new ApiError(400, 'bad-request', `'kind' must be one of ${checkpointKindsAllowed.map((allowed) => `'${allowed}'`).join(', ')}, not ${JSON.stringify(kind)}`);
        }
        if (name !== undefined && (typeof name !== 'string' || name.length === 0 || name.length > 256)) throw new ApiError(400, 'bad-request', `'name' must be a string of 1 to 256 characters`);
        try {
          return { group: group.name, ...group.checkpoint(kind, name as string | undefined) };
        } catch (error) {
          // A sync runs or waits: the target is not consistent until it ends.
          throw new ApiError(409, 'cannot-checkpoint', (error as Error).message);
        }
      }
      case 'GET /groups/:group/checkpoints':
        return { group: needTarget().name, checkpoints: needTarget().checkpoints() };
      case 'POST /groups/:group/views': {
        const group = needTarget();
        const body = (await readBody(request)) as Record<string, unknown>;
        const known = ['volume', 'checkpoint', 'timeMs', 'latest', 'scratchBytesMax'];
        const unknown = Object.keys(body).filter((key) => !known.includes(key));
        if (unknown.length > 0) throw new ApiError(400, 'bad-request', `Unknown field ${unknown.map((key) => `'${key.slice(0, 64)}'`).join(', ')} (known: ${known.join(', ')})`);
        const volume = body['volume'];
        if (typeof volume !== 'string') throw new ApiError(400, 'bad-request', `'volume' must name a volume of the group`);
        const points = (['checkpoint', 'timeMs', 'latest'] as const).filter((key) => body[key] !== undefined);
        if (points.length !== 1) {
          throw new ApiError(400, 'bad-request', `Give exactly one of 'checkpoint' (an id), 'timeMs' or 'latest': true, not ${points.length === 0 ? 'none' : points.map((key) => `'${key}'`).join(' and ')}`);
        }
        let at: ViewPoint;
        if (points[0] === 'checkpoint') {
          if (typeof body['checkpoint'] !== 'string' || body['checkpoint'].length === 0) throw new ApiError(400, 'bad-request', `'checkpoint' must be a checkpoint id (a string)`);
          at = { checkpoint: body['checkpoint'] };
        } else if (points[0] === 'timeMs') {
          const timeMs = numberField(body, 'timeMs', 0);
          const nowMs = Date.now();
          if (timeMs > nowMs + viewTimeAheadMsMax) {
            throw new ApiError(
              400,
              'bad-request',
              `'timeMs' ${timeMs} (${new Date(timeMs).toISOString()}) is ${timeMs - nowMs} ms ahead of this appliance's clock (${new Date(nowMs).toISOString()}; at most ${viewTimeAheadMsMax} ms of clock skew is allowed): a view shows a point that has happened; for the newest one give 'latest': true`,
            );
          }
          at = { timeMs };
        } else {
          if (body['latest'] !== true) throw new ApiError(400, 'bad-request', `'latest' must be true (or left out)`);
          at = { timeMs: latestTimeMs };
        }
        const scratchTotalMax = appliance.config.receive!.viewsScratchBytesMax;
        const scratchBytesMax = body['scratchBytesMax'] === undefined ? Math.min(viewScratchBytesDefault, scratchTotalMax) : numberField(body, 'scratchBytesMax', 0);
        if (scratchBytesMax > scratchTotalMax) {
          throw new ApiError(400, 'bad-request', `'scratchBytesMax' ${scratchBytesMax} is above the ${scratchTotalMax} bytes all views of this appliance may reserve together (receive.viewsScratchBytesMax)`);
        }
        try {
          return await appliance.openView({ group: group.name, volume, at, scratchBytesMax });
        } catch (error) {
          if (error instanceof LimitReached) throw error;
          throw new ApiError(409, 'cannot-open-view', (error as Error).message);
        }
      }
      case 'GET /groups/:group/views':
        return { group: needTarget().name, views: appliance.listViews(groupName!) };
      case 'DELETE /groups/:group/views/:name': {
        const group = needTarget();
        const name = parts[4]!;
        const owner = appliance.viewGroup(name);
        if (owner !== group.name) {
          throw new ApiError(404, 'unknown-view', owner === undefined ? `Group '${group.name}' has no open view '${name}'` : `Group '${group.name}' has no open view '${name}' (it is a view of group '${owner}')`);
        }
        if (!(await appliance.closeView(name))) throw new ApiError(404, 'unknown-view', `Group '${group.name}' has no open view '${name}' (it was closed meanwhile)`);
        return { closed: name };
      }
      default:
        throw new ApiError(404, 'not-found', `No route ${method} ${url.pathname}`);
    }
  }
}
